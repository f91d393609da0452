"""EPSANet (Pyramid Squeeze Attention networks) for timm.

Importing this package registers ``epsanet50``, ``epsanet101``, ``epsanet50_large`` and
``epsanet101_large`` with timm, so ``timm.create_model("epsanet50")`` and every timm tool that
creates models by name can build them.
"""

from .epsanet import HUB_ORGANIZATION, EPSABottleneck, checkpoint_filter_fn
from .layers import PyramidSqueezeAttention

__version__ = '0.1.0'

__all__ = [
    'HUB_ORGANIZATION',
    'EPSABottleneck',
    'PyramidSqueezeAttention',
    'checkpoint_filter_fn',
    '__version__',
]
