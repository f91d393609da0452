"""Ops behind the PSA layer: one entry point per op, picking the implementation for the tensor's device.

``psa_branch_convs`` is what ``PyramidSqueezeAttention.forward_fast`` asks for; each device's machinery
lives in a file of its own (``psa_cpu.py``) and is checked against the layer's ``forward_reference``.
To add a backend, see the README's "Adding a device backend".
"""

from typing import List

import torch

from .common import same_padding
from .psa_cpu import (
    branch_conv,
    caller_layout,
    fast_layout,
    install_channels_last_stem,
    pyramid_branch_convs,
    stem_layout,
    use_branch_function,
)

__all__ = [
    'caller_layout',
    'fast_layout',
    'install_channels_last_stem',
    'psa_branch_convs',
    'same_padding',
    'stem_layout',
]


def psa_branch_convs(
    x: torch.Tensor, weights: List[torch.Tensor], groups: List[int], stride: int, dilation: int
) -> torch.Tensor:
    """All branch convolutions of a PSA module, concatenated last branch first (the authors' order).

    Branch ``i`` is ``conv2d(x, weights[i], stride, same_padding(k_i, dilation), dilation, groups[i])``.
    On CPU under autograd the branches run through ``psa_cpu.PyramidBranchConvs``; otherwise each branch is
    one ``psa_cpu.branch_conv`` (a plain grouped convolution off the CPU).
    """
    if not torch.jit.is_scripting() and use_branch_function(x, weights):
        feats = pyramid_branch_convs(x, weights, groups, stride, dilation)
    else:  # TorchScript cannot call autograd Functions: plain autograd through branch_conv
        feats: List[torch.Tensor] = []
        for i in range(len(weights)):  # (TorchScript has no zip(strict=))
            padding = same_padding(weights[i].shape[-1], dilation)
            feats.append(
                branch_conv(x, weights[i], [stride, stride], [padding, padding], [dilation, dilation], groups[i])
            )
    feats.reverse()
    return torch.cat(feats, dim=1)
