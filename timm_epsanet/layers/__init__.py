"""Layers of the EPSANet models."""

from .pyramid_squeeze_attn import PSA_IMPLS, PyramidSqueezeAttention

__all__ = ['PSA_IMPLS', 'PyramidSqueezeAttention']
