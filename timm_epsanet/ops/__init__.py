"""Ops behind the PSA layer: one entry point per op, picking the implementation for the tensor's device.

``psa_branch_convs`` is what ``PyramidSqueezeAttention.forward_fast`` asks for. Each device's machinery
lives in a file of its own, checked against the layer's ``forward_reference``:

* ``psa_cpu.py``: oneDNN-friendly layouts, depthwise forwards, merged weight gradients (CPU).
* ``psa_triton.py``: Triton kernels, forward and both gradients, as ``torch.library`` custom ops (CUDA).
* ``psa_cuda.py``: cuDNN formulations (grouped, block-diagonal densified) and the per-shape choice between
  them and the Triton kernels, measured on first use.

To add a backend, see CONTRIBUTING.md ("Adding a device backend").
"""

from typing import Callable, Dict, List

import torch

from . import psa_cuda, psa_triton
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
    'PSA_IMPLS',
    'caller_layout',
    'check_psa_impl',
    'fast_layout',
    'install_channels_last_stem',
    'psa_branch_convs',
    'same_padding',
    'stem_layout',
]

# 'fast': the fastest implementation for the device (measured per shape on CUDA); 'reference': plain modules
# (the layer's forward_reference, never through here); 'triton': the Triton kernels, by explicit request.
PSA_IMPLS = ('fast', 'reference', 'triton')


def check_psa_impl(impl: str) -> None:
    """Raise ValueError for an unknown implementation name, RuntimeError for 'triton' without Triton."""
    if impl not in PSA_IMPLS:
        raise ValueError(f'PyramidSqueezeAttention: impl must be one of {PSA_IMPLS}, got {impl!r}.')
    if impl == 'triton' and psa_triton.triton is None:
        raise RuntimeError("PSA implementation 'triton' needs Triton, which is not installed (pip install triton).")


def psa_branch_convs(
    x: torch.Tensor, weights: List[torch.Tensor], groups: List[int], stride: int, dilation: int, impl: str = 'fast'
) -> torch.Tensor:
    """All branch convolutions of a PSA module, concatenated last branch first (the authors' order).

    Branch ``i`` is ``conv2d(x, weights[i], stride, same_padding(k_i, dilation), dilation, groups[i])``.

    * ``impl='triton'``: the Triton kernels, or a RuntimeError saying why they cannot run here (no Triton,
      not a CUDA tensor; on CPU they run in Triton's interpreter when ``TRITON_INTERPRET=1``).
    * ``impl='fast'`` on CUDA: whichever of the Triton kernels and cuDNN's grouped or densified convolutions
      measured fastest for this shape, dtype and layout on first use (``psa_cuda.choose``); without Triton,
      cuDNN only.
    * ``impl='fast'`` elsewhere (and under TorchScript): on CPU under autograd ``psa_cpu.PyramidBranchConvs``,
      otherwise one ``psa_cpu.branch_conv`` per branch (a plain grouped convolution off the CPU).
    """
    if not torch.jit.is_scripting():
        if impl == 'triton':
            return _triton_branch_convs(x, weights, groups, stride, dilation)
        if impl != 'fast':
            check_psa_impl(impl)
        if x.is_cuda:
            return _cuda_branch_convs(x, weights, groups, stride, dilation)
    if not torch.jit.is_scripting() and use_branch_function(x, weights):
        feats = pyramid_branch_convs(x, weights, groups, stride, dilation)
    else:  # TorchScript cannot call autograd Functions or custom kernels: plain autograd through branch_conv
        feats: List[torch.Tensor] = []
        for i in range(len(weights)):  # (TorchScript has no zip(strict=))
            padding = same_padding(weights[i].shape[-1], dilation)
            feats.append(
                branch_conv(x, weights[i], [stride, stride], [padding, padding], [dilation, dilation], groups[i])
            )
    feats.reverse()
    return torch.cat(feats, dim=1)


@torch.jit.unused
def _triton_branch_convs(
    x: torch.Tensor, weights: List[torch.Tensor], groups: List[int], stride: int, dilation: int
) -> torch.Tensor:
    reason = psa_triton.triton_unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"PSA implementation 'triton' cannot run on this {x.device.type} tensor: {reason}.")
    return psa_triton.psa_branch_convs_triton(x, weights, groups, stride, dilation)


def _cuda_candidates(device: torch.device) -> Dict[str, Callable[..., torch.Tensor]]:
    """The implementations ``impl='fast'`` chooses from on ``device``, in order of preference."""
    candidates: Dict[str, Callable[..., torch.Tensor]] = {}
    if psa_triton.triton_unavailable_reason(device) is None:
        candidates['triton'] = psa_triton.psa_branch_convs_triton
    candidates['cudnn_grouped'] = psa_cuda.psa_branch_convs_grouped
    candidates['cudnn_densified'] = psa_cuda.psa_branch_convs_densified
    return candidates


@torch.jit.unused
def _cuda_branch_convs(
    x: torch.Tensor, weights: List[torch.Tensor], groups: List[int], stride: int, dilation: int
) -> torch.Tensor:
    candidates = _cuda_candidates(x.device)
    if torch.compiler.is_compiling():
        # Nothing can be timed while tracing: the first candidate (Triton, a custom op that traces without
        # graph breaks, else cuDNN's grouped convolutions) is compiled in.
        return next(iter(candidates.values()))(x, weights, groups, stride, dilation)
    args = (x, weights, groups, stride, dilation)
    name = psa_cuda.choose(psa_cuda.branch_convs_key(*args), candidates, args)
    return candidates[name](*args)
