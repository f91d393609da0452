"""PSA branch convolutions on CPU: layout choice, depthwise forwards, merged weight gradients, stem layout.

oneDNN, PyTorch's CPU backend, runs EPSANet's grouped large-kernel convolutions far below its dense speed
(the measurements behind each choice are quoted where it is made). Everything here computes exactly the
plain grouped convolutions of ``PyramidSqueezeAttention.forward_reference``, only faster:

* ``fast_layout`` / ``stem_layout``: which memory format a block or the stem runs fastest in;
  ``caller_layout``: the caller's memory format again, for maps handed back.
* ``branch_conv``: a branch as depthwise convolutions plus a group sum where oneDNN's depthwise kernels win.
* ``PyramidBranchConvs``: all branches of a module under autograd, with grouped backwards and the weight
  gradients of several branches from one merged convolution.
* ``ChannelsLastStemConv2d`` / ``install_channels_last_stem``: the stem convolution on a channels_last copy.

Nothing here knows a model or a layer: functions take tensors, and the stem helper any module with a plain
``conv1``.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import same_padding

__all__ = [
    'ChannelsLastStemConv2d',
    'PyramidBranchConvs',
    'branch_conv',
    'caller_layout',
    'fast_layout',
    'install_channels_last_stem',
    'pyramid_branch_convs',
    'stem_layout',
    'use_branch_function',
]


def fast_layout(
    x: torch.Tensor, weight: torch.Tensor, min_area: int = 28 * 28, min_positions: int = 2 * 28 * 28
) -> torch.Tensor:
    """``x`` in the layout an EPSANet block runs fastest in on CPU (elsewhere ``x`` itself).

    ``weight`` is a spatial conv weight of the block; its layout tells whether the model was put in
    channels_last. oneDNN's grouped large-kernel convolutions are 1.3-5x faster (forward and backward)
    on channels_last maps, so the block runs channels_last whenever autograd records, and at inference on
    maps of ``min_area`` pixels (28x28) and more when the batch holds ``min_positions`` map positions.
    Otherwise (the 14x14 and 7x7 maps of stages 3-4, a single 28x28 image) NCHW kernels, grouped and 1x1
    convs alike, are as fast or faster for an NCHW model, which keeps its layout there; a channels_last
    model is fastest left as it is.
    """
    if x.device.type != 'cpu' or x.dim() != 4:
        return x
    if (
        torch.is_grad_enabled()
        or (x.shape[-2] * x.shape[-1] >= min_area and x.shape[0] * x.shape[-2] * x.shape[-1] >= min_positions)
        or (weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous())
    ):
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def caller_layout(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y``, a map computed from the input ``x``, in ``x``'s memory format.

    ``fast_layout`` and the channels_last stem move maps to channels_last where that runs faster, so which
    maps come out channels_last depends on map size, batch and grad mode. Maps handed back to a caller
    (feature maps, intermediates) go through here: channels_last for a channels_last input, NCHW for any
    other, whatever ran inside. A map already in that format is returned as is (no copy): on every device
    but the CPU, where the fast path keeps PyTorch's layouts, that is the rule.
    """
    if y.dim() != 4:
        return y
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y.contiguous(memory_format=torch.channels_last)
    return y.contiguous()


def _use_depthwise(x: torch.Tensor, weight: torch.Tensor, groups: int, min_positions: int = 1024) -> bool:
    """Whether ``branch_conv`` re-expresses this grouped convolution as depthwise ones (see there).

    With three or four outputs per group the re-expression only pays with large kernels on at least
    ``min_positions`` positions (batch x height x width): below, its extra convolutions and group sum
    cost more than they save.
    """
    if x.device.type != 'cpu' or groups == 1:
        return False
    out_per_group, kernel_size = weight.shape[0] // groups, weight.shape[-1]
    if out_per_group <= 2:
        return True
    positions = x.shape[0] * x.shape[-2] * x.shape[-1]
    return out_per_group <= 4 and kernel_size >= 7 and positions >= min_positions


def _depthwise_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
) -> torch.Tensor:
    """A grouped convolution (no bias) computed as one depthwise convolution per output slot of a group.

    Output ``j`` of every group is a depthwise convolution of all input channels with the groups' slot-``j``
    kernels, summed over each group's input channels: the same MACs as the grouped convolution.
    """
    out_chs, in_per_group, kh, kw = weight.shape
    out_per_group = out_chs // groups
    in_chs = in_per_group * groups
    slots = weight.view(groups, out_per_group, in_per_group, kh, kw)
    outs: List[torch.Tensor] = []
    channels_last = False
    for j in range(out_per_group):
        y = F.conv2d(x, slots[:, j].reshape(in_chs, 1, kh, kw), None, stride, padding, dilation, in_chs)
        batch, _, height, width = y.shape
        channels_last = y.is_contiguous(memory_format=torch.channels_last)
        if channels_last:  # sum each group's channels where they are adjacent, keeping the layout
            outs.append(y.permute(0, 2, 3, 1).reshape(batch, height, width, groups, in_per_group).sum(-1))
        else:
            outs.append(y.reshape(batch, groups, in_per_group, height, width).sum(2))
    if channels_last:
        # (B, H, W, groups, out_per_group) is the grouped conv's channel order, channels_last.
        y = outs[0] if out_per_group == 1 else torch.stack(outs, dim=-1)
        return y.reshape(y.shape[0], y.shape[1], y.shape[2], out_chs).permute(0, 3, 1, 2)
    y = outs[0] if out_per_group == 1 else torch.stack(outs, dim=2)
    return y.reshape(y.shape[0], out_chs, y.shape[-2], y.shape[-1])


def _grouped_conv_backward(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: int,
    dilation: int,
    groups: int,
    output_mask: List[bool],
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Input and weight gradients (as ``output_mask`` asks) of a bias-free PSA-style grouped convolution."""
    padding = same_padding(weight.shape[-1], dilation)
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_output,
        x,
        weight,
        None,
        [stride, stride],
        [padding, padding],
        [dilation, dilation],
        False,
        [0, 0],
        groups,
        output_mask + [False],
    )
    return grad_input, grad_weight


def _merged_weight_grad_branches(kernel_sizes: List[int], groups: List[int], out_area: int) -> List[int]:
    """Branches whose weight gradients ``PyramidBranchConvs`` computes in one merged convolution.

    oneDNN's weight gradient of a grouped conv with few channels per group is bound by its tiling, not
    its MACs: merging grouped branches into one convolution (the coarsest of their groups, the largest
    of their kernels, the other weights as zero-padded blocks) takes about the time of one of them.
    Measured on CPU (channels_last, batch 8, EPSANet-50's 5x5/4, 7x7/8 and 9x9/16 branches): on 56x56
    maps all three merged take 8.2 ms against 15.2 ms apart; on 28x28 and 14x14 maps merging all three
    loses but merging the two largest kernels wins (5.1 vs 7.1 ms, 2.4 vs 3.2 ms); on 7x7 maps merging
    loses. Only branches whose groups divide each other can merge.
    """
    grouped = sorted((i for i, g in enumerate(groups) if g > 1), key=lambda i: -kernel_sizes[i])
    if out_area >= 56 * 56:
        merged = grouped
    elif out_area >= 14 * 14:
        merged = grouped[:2]
    else:
        return []
    coarsest = min((groups[i] for i in merged), default=1)
    if len(merged) < 2 or any(groups[i] % coarsest for i in merged):
        return []
    return sorted(merged)


def _merged_weight_grads(
    grad_outputs: List[torch.Tensor],
    x: torch.Tensor,
    weights: List[torch.Tensor],
    groups: List[int],
    stride: int,
    dilation: int,
) -> List[torch.Tensor]:
    """Weight gradients of several grouped convolutions of ``x`` from one merged convolution's backward.

    Merged group ``q`` holds, branch after branch, the outputs of every branch group that reads the
    input channels of ``q``; a branch's weights sit on the diagonal blocks of its rows, centred in the
    largest kernel, so the merged conv computes each branch's outputs exactly and its weight gradient
    holds each branch's gradient at those places.
    """
    merged_groups = min(groups)
    kernel = max(w.shape[-1] for w in weights)
    batch, in_chs = x.shape[0], x.shape[1]
    out_height, out_width = grad_outputs[0].shape[-2], grad_outputs[0].shape[-1]
    # (B, G, rows of each branch, H, W) -> merged rows in group-major order. Sizes are spelled out, not -1:
    # an empty batch (DDP's uneven last batch) leaves a -1 undetermined.
    grad_merged = torch.cat(
        [g.reshape(batch, merged_groups, g.shape[1] // merged_groups, out_height, out_width) for g in grad_outputs],
        dim=2,
    )
    grad_merged = grad_merged.reshape(batch, grad_merged.shape[1] * grad_merged.shape[2], out_height, out_width)
    weight_shape = [grad_merged.shape[1], in_chs // merged_groups, kernel, kernel]
    merged_weight = x.new_zeros(weight_shape)  # only its shape matters for the weight gradient
    _, grad_weight = _grouped_conv_backward(
        grad_merged, x, merged_weight, stride, dilation, merged_groups, [False, True]
    )
    grad_weight = grad_weight.view(merged_groups, -1, in_chs // merged_groups, kernel, kernel)
    grads: List[torch.Tensor] = []
    row = 0
    for weight, g in zip(weights, groups, strict=True):
        out_per_group, in_per_group, k = weight.shape[0] // g, weight.shape[1], weight.shape[-1]
        ratio = g // merged_groups  # branch groups per merged group
        rows = ratio * out_per_group
        block = grad_weight[:, row : row + rows].reshape(
            merged_groups, ratio, out_per_group, ratio, in_per_group, kernel, kernel
        )
        # branch group q * ratio + s reads merged-group inputs s * in_per_group ... : the block diagonal
        block = block.diagonal(dim1=1, dim2=3).permute(0, 5, 1, 2, 3, 4)
        crop = (kernel - k) // 2
        grads.append(
            block.reshape(weight.shape[0], in_per_group, kernel, kernel)[..., crop : crop + k, crop : crop + k]
        )
        row += rows
    return [grad.contiguous() for grad in grads]


class PyramidBranchConvs(torch.autograd.Function):
    """The branch convolutions of a PSA module under autograd, each computed the fastest way.

    Forward: every branch through ``branch_conv``'s choice (depthwise re-expression or grouped conv),
    keeping only the input and the weights for the backward. Backward: input gradients from the grouped
    kernels (oneDNN's depthwise backward is slower than its grouped one), and the weight gradients of
    the branches ``_merged_weight_grad_branches`` picks from one merged convolution.
    """

    @staticmethod
    def forward(ctx, x, groups, stride, dilation, *weights):
        ctx.save_for_backward(x, *weights)
        ctx.groups, ctx.stride, ctx.dilation = groups, stride, dilation
        feats = []
        for weight, g in zip(weights, groups, strict=True):
            padding = same_padding(weight.shape[-1], dilation)
            feats.append(branch_conv(x, weight, [stride, stride], [padding, padding], [dilation, dilation], g))
        return tuple(feats)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs):
        x, *weights = ctx.saved_tensors
        groups, stride, dilation = ctx.groups, ctx.stride, ctx.dilation
        need_input, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[4:]
        merged = _merged_weight_grad_branches(
            [w.shape[-1] for w in weights], groups, grad_outputs[0].shape[-2] * grad_outputs[0].shape[-1]
        )
        merged = [i for i in merged if need_weights[i]]
        if len(merged) < 2:
            merged = []
        grad_input = None
        grad_weights = [None] * len(weights)
        for i, (weight, g, grad) in enumerate(zip(weights, groups, grad_outputs, strict=True)):
            mask = [need_input, need_weights[i] and i not in merged]
            if not any(mask):
                continue
            gx, gw = _grouped_conv_backward(grad, x, weight, stride, dilation, g, mask)
            if gx is not None:
                grad_input = gx if grad_input is None else grad_input.add_(gx)
            grad_weights[i] = gw
        if merged:
            merged_grads = _merged_weight_grads(
                [grad_outputs[i] for i in merged],
                x,
                [weights[i] for i in merged],
                [groups[i] for i in merged],
                stride,
                dilation,
            )
            for i, gw in zip(merged, merged_grads, strict=True):
                grad_weights[i] = gw
        return (grad_input, None, None, None, *grad_weights)


def branch_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
) -> torch.Tensor:
    """A PSA branch convolution (no bias), computed depthwise where that is faster.

    On CPU, oneDNN's depthwise kernels run several times faster than its grouped ones when a group has
    few outputs (measured, channels_last: 2-8x forward for one or two outputs per group, and with large
    kernels on large maps for four), so such branches run as depthwise convolutions plus a group sum
    (``_depthwise_conv``); under autograd a PSA module pairs them with grouped backwards
    (``PyramidBranchConvs``).
    Only the weight view changes: the parameter and its gradient are the original grouped-conv tensor.
    """
    # Autograd through the depthwise form would keep a map per output slot and run slow depthwise
    # backwards: outside ``PyramidBranchConvs`` the grouped conv is the better trade when recording.
    recording = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if _use_depthwise(x, weight, groups) and not recording:
        return _depthwise_conv(x, weight, stride, padding, dilation, groups)
    return F.conv2d(x, weight, None, stride, padding, dilation, groups)


@torch.jit.unused
def use_branch_function(x: torch.Tensor, weights: List[torch.Tensor]) -> bool:
    """Whether a PSA module's branch convolutions go through ``PyramidBranchConvs``."""
    if x.device.type != 'cpu' or not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
        # (Under autocast the saved tensors would not match the gradients' dtype.)
        return False
    return x.requires_grad or any(w.requires_grad for w in weights)


@torch.jit.unused
def pyramid_branch_convs(
    x: torch.Tensor, weights: List[torch.Tensor], groups: List[int], stride: int, dilation: int
) -> List[torch.Tensor]:
    """The branch outputs through ``PyramidBranchConvs`` (kept out of TorchScript's sight)."""
    return list(PyramidBranchConvs.apply(x, groups, stride, dilation, *weights))


def stem_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the stem takes it fastest: channels_last on CPU (see ``ChannelsLastStemConv2d``)."""
    if x.device.type == 'cpu' and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


# A leaf for FX tracing: the device choice is made when the graph runs, not when traced.
torch.fx.wrap('stem_layout')


class ChannelsLastStemConv2d(nn.Conv2d):
    """The stem convolution, taken on a channels_last copy of the image on CPU.

    Everything after it (norm, activation, max-pool, the blocks) keeps that layout. On NCHW maps PyTorch's
    CPU stem is slow: the 7x7/2 convolution runs 2-4x and the 3x3/2 max-pool 7-15x slower than on
    channels_last ones (max-pool on 64x112x112: 2.1 vs 0.14 ms at batch 1). Same parameters, same values.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(stem_layout(x), self.weight, self.bias)


def install_channels_last_stem(model: nn.Module) -> None:
    """Swap a plain ``nn.Conv2d`` stem for ``ChannelsLastStemConv2d`` sharing its parameters (deep stems stay)."""
    conv = getattr(model, 'conv1', None)
    if type(conv) is not nn.Conv2d:
        return
    stem = ChannelsLastStemConv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device='meta',
    )
    stem.weight, stem.bias = conv.weight, conv.bias
    model.conv1 = stem
