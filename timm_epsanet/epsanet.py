"""EPSANet: ResNet with Pyramid Squeeze Attention (PSA) blocks

A timm port of EPSANet. The bottleneck's 3x3 convolution is replaced by a PSA module: several
convolutions with growing kernels and groups look at the same input, one squeeze-excite module
scores every branch, and a softmax across the branches weighs them before they are concatenated.

The port computes what the authors' PyTorch code computes (checked against golden outputs of
their `epsanet50` / `epsanet101` in tests/) and keeps their state dict names, so checkpoints
written by their `main.py` load unchanged.

Papers:
* `EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network`
    - https://arxiv.org/abs/2105.14447

Official impl: https://github.com/murufeng/EPSANet (no pretrained weights were ever released)
"""

import math
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SEModule
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._helpers import clean_state_dict
from timm.models.resnet import ResNet

__all__ = ['PyramidSqueezeAttention', 'EPSABottleneck', 'checkpoint_filter_fn', 'HUB_ORGANIZATION']

# The one place that says where this package's weights live on the Hugging Face Hub.
# Publishing under another organisation is a change of this line.
HUB_ORGANIZATION = 'timm-epsanet'

PSA_IMPLS = ('fast', 'reference')


def _fast_layout(
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


def _use_depthwise(x: torch.Tensor, weight: torch.Tensor, groups: int, min_positions: int = 1024) -> bool:
    """Whether ``_branch_conv`` re-expresses this grouped convolution as depthwise ones (see there).

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


def _same_padding(kernel_size: int, dilation: int) -> int:
    """Padding that keeps a (possibly dilated) odd-kernel branch aligned with its input, as the PSA builds it."""
    return dilation * (kernel_size - 1) // 2


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
    padding = _same_padding(weight.shape[-1], dilation)
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
    """Branches whose weight gradients ``_PyramidBranchConvs`` computes in one merged convolution.

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
    # (B, G, rows of each branch, H, W) -> merged rows in group-major order
    grad_merged = torch.cat(
        [g.reshape(batch, merged_groups, -1, out_height, out_width) for g in grad_outputs], dim=2
    ).reshape(batch, -1, out_height, out_width)
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


class _PyramidBranchConvs(torch.autograd.Function):
    """The branch convolutions of a PSA module under autograd, each computed the fastest way.

    Forward: every branch through ``_branch_conv``'s choice (depthwise re-expression or grouped conv),
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
            padding = _same_padding(weight.shape[-1], dilation)
            feats.append(_branch_conv(x, weight, [stride, stride], [padding, padding], [dilation, dilation], g))
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


def _branch_conv(
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
    (``_PyramidBranchConvs``).
    Only the weight view changes: the parameter and its gradient are the original grouped-conv tensor.
    """
    # Autograd through the depthwise form would keep a map per output slot and run slow depthwise
    # backwards: outside ``_PyramidBranchConvs`` the grouped conv is the better trade when recording.
    recording = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if _use_depthwise(x, weight, groups) and not recording:
        return _depthwise_conv(x, weight, stride, padding, dilation, groups)
    return F.conv2d(x, weight, None, stride, padding, dilation, groups)


@torch.jit.unused
def _use_branch_function(x: torch.Tensor, weights: List[torch.Tensor]) -> bool:
    """Whether a PSA module's branch convolutions go through ``_PyramidBranchConvs``."""
    if x.device.type != 'cpu' or not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
        # (Under autocast the saved tensors would not match the gradients' dtype.)
        return False
    return x.requires_grad or any(w.requires_grad for w in weights)


@torch.jit.unused
def _pyramid_branch_convs(
    x: torch.Tensor, weights: List[torch.Tensor], groups: List[int], stride: int, dilation: int
) -> List[torch.Tensor]:
    """The branch outputs through ``_PyramidBranchConvs`` (kept out of TorchScript's sight)."""
    return list(_PyramidBranchConvs.apply(x, groups, stride, dilation, *weights))


def _psa_branches(
    x: torch.Tensor, weights: List[torch.Tensor], groups: List[int], stride: int, dilation: int
) -> torch.Tensor:
    """All branch convolutions of a PSA module, concatenated last branch first (the authors' order)."""
    if not torch.jit.is_scripting() and _use_branch_function(x, weights):
        feats = _pyramid_branch_convs(x, weights, groups, stride, dilation)
    else:  # TorchScript cannot call autograd Functions: plain autograd through _branch_conv
        feats: List[torch.Tensor] = []
        for i in range(len(weights)):  # (TorchScript has no zip(strict=))
            padding = _same_padding(weights[i].shape[-1], dilation)
            feats.append(
                _branch_conv(x, weights[i], [stride, stride], [padding, padding], [dilation, dilation], groups[i])
            )
    feats.reverse()
    return torch.cat(feats, dim=1)


def _stem_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the stem takes it fastest: channels_last on CPU (see ``_ChannelsLastStemConv2d``)."""
    if x.device.type == 'cpu' and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


# Leaves for FX tracing: their device / grad-mode choices are made when the graph runs, not when traced.
torch.fx.wrap('_fast_layout')
torch.fx.wrap('_psa_branches')
torch.fx.wrap('_stem_layout')


class PyramidSqueezeAttention(nn.ModuleDict):
    """Pyramid Squeeze Attention (PSA) module.

    Every branch convolves *all* input channels to ``out_chs // num_branches`` channels with its own
    kernel size and group count. One squeeze-excite module, shared by all branches, turns each branch
    output into a sigmoid gate; a softmax across the branch axis then weighs the branches, and the
    weighted branches are concatenated.

    Concatenation order follows the authors' code, which is *reversed*: the last branch (largest
    kernel) comes first in the output channels. Keeping it means their weights for the layers after
    this module (``bn2``, ``conv3``) mean the same thing here.

    The module is a ``ModuleDict`` so that the branch convolutions keep the authors' state dict names
    (``conv_1`` ... ``conv_N``, ``se``) and stay iterable under TorchScript and FX.

    Args:
        in_chs: Input channels.
        out_chs: Output channels, divisible by the number of branches.
        kernel_sizes: Kernel size of each branch.
        groups: Convolution groups of each branch; must divide ``in_chs`` and ``out_chs // num_branches``.
        stride: Stride of every branch convolution.
        dilation: Dilation of every branch convolution; padding keeps the output aligned.
        rd_ratio: Squeeze-excite reduction (hidden channels = floor(branch channels * rd_ratio)).
        act_layer: Activation inside the squeeze-excite module.
        impl: ``'fast'`` (default) runs :meth:`forward_fast`, ``'reference'`` runs :meth:`forward_reference`;
            both compute the same function (to float rounding) from the same parameters. Can be changed on a
            built module through the ``impl`` attribute.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_sizes: Sequence[int] = (3, 5, 7, 9),
        groups: Sequence[int] = (1, 4, 8, 16),
        stride: int = 1,
        dilation: int = 1,
        rd_ratio: float = 1.0 / 16,
        act_layer: Type[nn.Module] = nn.ReLU,
        impl: str = 'fast',
        device=None,
        dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        if impl not in PSA_IMPLS:
            raise ValueError(f'PyramidSqueezeAttention: impl must be one of {PSA_IMPLS}, got {impl!r}.')
        if len(kernel_sizes) != len(groups):
            raise ValueError(f'PyramidSqueezeAttention: {len(kernel_sizes)} kernel sizes but {len(groups)} groups.')
        num_branches = len(kernel_sizes)
        if num_branches < 1 or out_chs % num_branches:
            raise ValueError(
                f'PyramidSqueezeAttention: out_chs={out_chs} must be divisible by the number of branches '
                f'({num_branches}).'
            )
        branch_chs = out_chs // num_branches
        for k, g in zip(kernel_sizes, groups, strict=True):
            if k % 2 == 0:
                raise ValueError(f'PyramidSqueezeAttention: kernel sizes must be odd, got {k}.')
            if in_chs % g or branch_chs % g:
                raise ValueError(
                    f'PyramidSqueezeAttention: groups={g} must divide in_chs={in_chs} '
                    f'and the branch width {branch_chs}.'
                )
        rd_channels = int(branch_chs * rd_ratio)
        if rd_channels < 1:
            raise ValueError(
                f'PyramidSqueezeAttention: branch width {branch_chs} is too narrow for rd_ratio={rd_ratio}.'
            )

        branches = OrderedDict()
        for i, (k, g) in enumerate(zip(kernel_sizes, groups, strict=True)):
            branches[f'conv_{i + 1}'] = nn.Conv2d(
                in_chs,
                branch_chs,
                kernel_size=k,
                stride=stride,
                padding=_same_padding(k, dilation),
                dilation=dilation,
                groups=g,
                bias=False,
                **dd,
            )
        # One SE module scores every branch; its 1x1 convs carry biases as in the authors' code.
        branches['se'] = SEModule(branch_chs, rd_channels=rd_channels, bias=True, act_layer=act_layer, **dd)
        super().__init__(branches)
        self.num_branches = num_branches
        self.branch_chs = branch_chs
        self.impl = impl

    def branch_gate(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid gate of the shared squeeze-excite module for one branch, shape (B, C, 1, 1)."""
        se = self.se
        x_se = x.mean((2, 3), keepdim=True)
        x_se = se.act(se.bn(se.fc1(x_se)))
        return se.gate(se.fc2(x_se))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == 'reference':
            return self.forward_reference(x)
        return self.forward_fast(x)

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The PSA function of :meth:`forward_reference`, computed the fast way.

        * On CPU the branches run in the layout ``_fast_layout`` picks (channels_last on large maps and
          under autograd); the output keeps it, and later layers follow.
        * Branch convolutions with few outputs per group run as depthwise convolutions (``_branch_conv``);
          under autograd with grouped backwards and merged weight gradients (``_PyramidBranchConvs``).
        * The squeeze-excite module runs once, as matrix products, on the pooled features of all branches
          stacked on the batch axis, and the branches are concatenated once (in the authors' reversed order) and
          weighted in a single multiply.
        """
        x = _fast_layout(x, self.conv_1.weight)
        weights: List[torch.Tensor] = []
        groups: List[int] = []
        for layer in self.values():
            if hasattr(layer, 'groups'):  # the branch convs, not 'se' (TorchScript resolves this per module)
                weights.append(layer.weight)
                groups.append(layer.groups)
        # (B, N * C, H, W), branches in the authors' concatenation order: last branch first.
        out = _psa_branches(x, weights, groups, self.conv_1.stride[0], self.conv_1.dilation[0])

        batch, num_branches, branch_chs = out.shape[0], self.num_branches, self.branch_chs
        se = self.se
        pooled = out.mean((2, 3)).view(batch, num_branches, branch_chs).transpose(0, 1)
        pooled = pooled.reshape(num_branches * batch, branch_chs)
        # The SE module's 1x1 convs on 1x1 maps as the matrix products they are: a tenth of the overhead.
        hidden = F.linear(pooled, se.fc1.weight.flatten(1), se.fc1.bias)
        hidden = se.act(se.bn(hidden.view(hidden.shape[0], hidden.shape[1], 1, 1))).flatten(1)
        gates = se.gate(F.linear(hidden, se.fc2.weight.flatten(1), se.fc2.bias))
        # Softmax across branches of the *sigmoid* outputs, as the authors compute it.
        attn = gates.view(num_branches, batch, branch_chs).softmax(dim=0)
        attn = attn.transpose(0, 1).reshape(batch, num_branches * branch_chs, 1, 1)
        return out * attn if torch.is_grad_enabled() else out.mul_(attn)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The PSA function written plainly, one step per line of the paper; the fast path's yardstick."""
        feats: List[torch.Tensor] = []
        gates: List[torch.Tensor] = []
        for name, layer in self.items():
            if name != 'se':
                feat = layer(x)
                feats.append(feat)
                gates.append(self.branch_gate(feat))
        # Softmax across branches of the *sigmoid* outputs, as the authors compute it.
        attn = torch.stack(gates, dim=1).softmax(dim=1)
        weighted = [feats[i] * attn[:, i] for i in range(self.num_branches)]
        weighted.reverse()  # authors' concatenation order: last branch first
        return torch.cat(weighted, dim=1)


def _check_downsample_input(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Return ``x``, or refuse a map too small to downsample (padding alone would make the output).

    Each stride-2 stage needs at least 2 pixels per side, so an image side must be more than half the
    network's output stride (17 at output_stride 32, 9 at 16, 5 at 8).
    """
    height, width = x.shape[-2], x.shape[-1]
    if height < stride or width < stride:
        raise ValueError(
            f'EPSANet: a {height}x{width} feature map is too small to downsample by {stride}: the input image '
            f'is too small for the output_stride (each side must be more than half of it, e.g. at least 17 '
            f'pixels at output_stride=32).'
        )
    return x


# A leaf for FX tracing: the check runs on real shapes when the graph runs. It returns x so that FX
# feature extraction (which drops nodes without users) keeps it.
torch.fx.wrap('_check_downsample_input')


class EPSABottleneck(nn.Module):
    """ResNet bottleneck whose 3x3 convolution is a Pyramid Squeeze Attention module.

    Takes the block arguments timm's ``ResNet`` passes to every block. ``cardinality`` and
    ``base_width`` set the bottleneck width as in ResNeXt (width = planes * base_width / 64 * cardinality),
    which is how the wide "Large" variants are built; the PSA's own groups come from ``psa_groups``.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        cardinality: int = 1,
        base_width: int = 64,
        reduce_first: int = 1,
        dilation: int = 1,
        first_dilation: Optional[int] = None,
        act_layer: Type[nn.Module] = nn.ReLU,
        norm_layer: Type[nn.Module] = nn.BatchNorm2d,
        attn_layer: Optional[Type[nn.Module]] = None,
        aa_layer: Optional[Type[nn.Module]] = None,
        drop_block: Optional[Type[nn.Module]] = None,
        drop_path: Optional[nn.Module] = None,
        psa_kernels: Sequence[int] = (3, 5, 7, 9),
        psa_groups: Sequence[int] = (1, 4, 8, 16),
        psa_rd_ratio: float = 1.0 / 16,
        psa_impl: str = 'fast',
        device=None,
        dtype=None,
    ):
        """
        Args:
            inplanes: Input channels.
            planes: Base channels; the block outputs ``planes * 4``.
            stride: Stride, applied in the PSA branch convolutions.
            downsample: Shortcut projection, or None for identity.
            cardinality: ResNeXt-style width multiplier (with ``base_width``).
            base_width: ResNeXt-style base width.
            reduce_first: Reduction of the first 1x1 conv's output width.
            dilation: Dilation of the PSA branches in this stage.
            first_dilation: Dilation of the PSA branches in this block (the first block of a stage).
            act_layer: Activation layer class.
            norm_layer: Normalization layer class.
            attn_layer: Not supported: the PSA module is this block's attention.
            aa_layer: Not supported by the PSA branches.
            drop_block: DropBlock layer class, applied after the PSA's norm.
            drop_path: DropPath layer instance for the residual branch.
            psa_kernels: Kernel size of each PSA branch.
            psa_groups: Groups of each PSA branch.
            psa_rd_ratio: Squeeze-excite reduction inside the PSA module.
            psa_impl: PSA forward implementation, ``'fast'`` or ``'reference'`` (same function).
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if attn_layer is not None:
            raise ValueError('EPSABottleneck: attn_layer is not supported, the PSA module is the attention.')
        if aa_layer is not None:
            raise ValueError('EPSABottleneck: aa_layer (anti-aliasing) is not supported by the PSA branches.')

        width = int(math.floor(planes * (base_width / 64)) * cardinality)
        first_planes = width // reduce_first
        outplanes = planes * self.expansion
        first_dilation = first_dilation or dilation

        self.conv1 = nn.Conv2d(inplanes, first_planes, kernel_size=1, bias=False, **dd)
        self.bn1 = norm_layer(first_planes, **dd)
        self.act1 = act_layer(inplace=True)

        self.conv2 = PyramidSqueezeAttention(
            first_planes,
            width,
            kernel_sizes=psa_kernels,
            groups=psa_groups,
            stride=stride,
            dilation=first_dilation,
            rd_ratio=psa_rd_ratio,
            impl=psa_impl,
            **dd,
        )
        self.bn2 = norm_layer(width, **dd)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        self.act2 = act_layer(inplace=True)

        self.conv3 = nn.Conv2d(width, outplanes, kernel_size=1, bias=False, **dd)
        self.bn3 = norm_layer(outplanes, **dd)
        self.act3 = act_layer(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation
        self.drop_path = drop_path

    def zero_init_last(self) -> None:
        """Zero the last norm's weight so the block starts as an identity."""
        if getattr(self.bn3, 'weight', None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = _check_downsample_input(x, self.stride)
        if self.conv2.impl == 'fast':
            # The whole block, shortcut included, runs in the PSA's fast layout: no mixed-layout residual add.
            x = _fast_layout(x, self.conv2.conv_1.weight)
        shortcut = x

        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)

        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)

        x = self.conv3(x)
        x = self.bn3(x)

        if self.drop_path is not None:
            x = self.drop_path(x)

        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act3(x)
        return x


class _ChannelsLastStemConv2d(nn.Conv2d):
    """The stem convolution, taken on a channels_last copy of the image on CPU.

    Everything after it (norm, activation, max-pool, the blocks) keeps that layout. On NCHW maps PyTorch's
    CPU stem is slow: the 7x7/2 convolution runs 2-4x and the 3x3/2 max-pool 7-15x slower than on
    channels_last ones (max-pool on 64x112x112: 2.1 vs 0.14 ms at batch 1). Same parameters, same values.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(_stem_layout(x), self.weight, self.bias)


def _install_channels_last_stem(model: ResNet) -> None:
    """Swap a plain ``nn.Conv2d`` stem for ``_ChannelsLastStemConv2d`` sharing its parameters (deep stems stay)."""
    conv = getattr(model, 'conv1', None)
    if type(conv) is not nn.Conv2d:
        return
    stem = _ChannelsLastStemConv2d(
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


def _describe_keys(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ', '.join(keys[:limit])
    return shown + (f', ... ({len(keys)} in all)' if len(keys) > limit else '')


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Turn an EPSANet checkpoint into a state dict for ``model``, or say exactly why it does not fit.

    Accepts a plain state dict (this package's, or the authors' model), a checkpoint written by the
    authors' ``main.py`` (``{'state_dict': {'module.*': ...}, 'epoch', 'arch', 'best_prec1', 'optimizer'}``)
    and one written by timm's train.py (``state_dict`` / ``state_dict_ema``). DataParallel's ``module.``
    and torch.compile's ``_orig_mod.`` prefixes are removed.

    The classifier and stem conv keys may differ in shape; timm re-initialises or adapts those for
    ``num_classes`` / ``in_chans`` after this filter. Any other missing, unexpected or mis-shaped key
    raises ``ValueError`` naming the keys, so a wrong checkpoint never loads partially.
    """
    if not isinstance(state_dict, dict):
        raise ValueError(f'Expected a checkpoint dict, got {type(state_dict).__name__}.')
    for wrapper_key in ('state_dict', 'model'):
        if isinstance(state_dict.get(wrapper_key), dict):
            state_dict = state_dict[wrapper_key]
            break
    state_dict = clean_state_dict(state_dict)
    state_dict = {k: v for k, v in state_dict.items() if torch.is_tensor(v)}

    expected = model.state_dict()
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    adaptable = tuple(f'{cfg.get(n)}.' for n in ('classifier', 'first_conv') if cfg.get(n))

    missing = set(expected) - set(state_dict)
    # A model built with num_classes=0 has no classifier; timm drops the checkpoint's after this filter.
    unexpected = {k for k in set(state_dict) - set(expected) if not k.startswith(adaptable)}
    # Checkpoints from before BatchNorm tracked its batch count load fine without it.
    missing = {k for k in missing if not k.endswith('num_batches_tracked')}
    mismatched = [
        f'{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}'
        for k in set(state_dict) & set(expected)
        if state_dict[k].shape != expected[k].shape and not k.startswith(adaptable)
    ]
    problems = []
    if missing:
        problems.append(f'missing keys: {_describe_keys(missing)}')
    if unexpected:
        problems.append(f'unexpected keys: {_describe_keys(unexpected)}')
    if mismatched:
        problems.append(f'shape mismatches (checkpoint vs model): {_describe_keys(mismatched)}')
    if problems:
        arch = cfg.get('architecture') or type(model).__name__
        raise ValueError(
            f'Checkpoint does not fit {arch}: '
            + '; '.join(problems)
            + '. Is it a checkpoint of another architecture or variant?'
        )
    return state_dict


def _create_epsanet(variant: str, pretrained: bool = False, **kwargs) -> ResNet:
    """Build an EPSANet variant on timm's ResNet, loading pretrained weights when asked.

    ``psa_impl='reference'`` builds the plain model: the reference PSA forward in every block (see
    ``PyramidSqueezeAttention``) and none of the fast path's layout choices, the stem's included.
    """
    psa_impl = kwargs.pop('psa_impl', 'fast')
    kwargs['block_args'] = dict(kwargs.get('block_args') or {}, psa_impl=psa_impl)
    if pretrained:  # file= weights are read by the package: safely, with one clear line for a bad file
        from .checkpoint_io import with_file_weights

        kwargs = with_file_weights(variant, kwargs)
    try:
        model = build_model_with_cfg(
            ResNet,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            **kwargs,
        )
    except Exception as e:
        hub_error = _weights_unavailable_error(variant, e, kwargs) if pretrained else None
        if hub_error is None:
            raise
        raise hub_error from e
    model.pretrained_cfg.pop('state_dict', None)  # loaded into the model; a copy in the cfg only holds memory
    if psa_impl == 'fast':
        _install_channels_last_stem(model)
    return model


def _weights_unavailable_error(variant: str, error: Exception, kwargs: Dict[str, Any]) -> Optional[Exception]:
    """A clear error when the Hub cannot provide a variant's weights, else None."""
    try:
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    if not isinstance(error, (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)):
        return None
    from timm.models._builder import resolve_pretrained_cfg

    pretrained_cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get('pretrained_cfg'),
        pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'),
    )
    hub_id = pretrained_cfg.hf_hub_id
    tag = f'{pretrained_cfg.architecture}.{pretrained_cfg.tag}' if pretrained_cfg.tag else variant
    if isinstance(error, LocalEntryNotFoundError):
        reason = 'they are not in the local Hugging Face cache and the Hub could not be reached (offline?)'
    else:
        reason = 'the Hub has no such repository, revision or weights file'
    return RuntimeError(
        f'Pretrained weights for {tag} are not available from the Hugging Face Hub repository {hub_id!r}: '
        f'{reason}. Weights for this tag may not be published yet (see the timm-epsanet README, "Weights"); '
        f'use pretrained=False, or load a local file with pretrained_cfg_overlay=dict(file=PATH).'
    )


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 0.875,
        'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1',
        'classifier': 'fc',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2105.14447',
        'paper_name': 'EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network',
        'origin_url': 'https://github.com/murufeng/EPSANet',
        **kwargs,
    }


_WEIGHTS_NOTE = (
    "Weights are trained with timm train.py or the authors' main.py (ImageNet-1k, 224x224) and "
    "converted to safetensors by timm-epsanet's hub_upload.py; the authors released no weights."
)
_LARGE_NOTE = (
    " Architecture reconstructed from the paper's published params/FLOPs (2x bottleneck width, "
    "PSA kernels 3/5/5/7, 32 groups per branch); the authors' code never contained it."
)

default_cfgs = generate_default_cfgs(
    {
        'epsanet50.in1k': _cfg(hf_hub_id=f'{HUB_ORGANIZATION}/epsanet50.in1k', notes=_WEIGHTS_NOTE),
        'epsanet101.in1k': _cfg(hf_hub_id=f'{HUB_ORGANIZATION}/epsanet101.in1k', notes=_WEIGHTS_NOTE),
        'epsanet50_large.in1k': _cfg(
            hf_hub_id=f'{HUB_ORGANIZATION}/epsanet50_large.in1k', notes=_WEIGHTS_NOTE + _LARGE_NOTE
        ),
        'epsanet101_large.in1k': _cfg(
            hf_hub_id=f'{HUB_ORGANIZATION}/epsanet101_large.in1k', notes=_WEIGHTS_NOTE + _LARGE_NOTE
        ),
    }
)

# The authors' "Small" configuration, used by their epsanet50() / epsanet101().
_SMALL_PSA = dict(psa_kernels=(3, 5, 7, 9), psa_groups=(1, 4, 8, 16))
# Reconstruction of "Large": wider bottleneck (ResNeXt 32x4d widths) and 32 groups in every branch.
# Kernels 3/5/5/7 reproduce the paper's 27.90M/4.72G and 49.59M/8.97G exactly; 3/5/7/9 would not.
_LARGE_PSA = dict(psa_kernels=(3, 5, 5, 7), psa_groups=(32, 32, 32, 32))


@register_model
def epsanet50(pretrained: bool = False, **kwargs) -> ResNet:
    """EPSANet-50 ("Small" in the paper): 22.56M params, 3.62 GMACs at 224x224."""
    model_args = dict(block=EPSABottleneck, layers=(3, 4, 6, 3), block_args=_SMALL_PSA, zero_init_last=False)
    return _create_epsanet('epsanet50', pretrained, **dict(model_args, **kwargs))


@register_model
def epsanet101(pretrained: bool = False, **kwargs) -> ResNet:
    """EPSANet-101 ("Small" in the paper): 38.90M params, 6.82 GMACs at 224x224."""
    model_args = dict(block=EPSABottleneck, layers=(3, 4, 23, 3), block_args=_SMALL_PSA, zero_init_last=False)
    return _create_epsanet('epsanet101', pretrained, **dict(model_args, **kwargs))


@register_model
def epsanet50_large(pretrained: bool = False, **kwargs) -> ResNet:
    """EPSANet-50 ("Large"), reconstructed from the paper's numbers: 27.90M params, 4.72 GMACs.

    The authors' code never contained this model. Width 2x (cardinality 32 x base width 4),
    PSA kernels 3/5/5/7 with 32 groups per branch reproduce the paper's params and FLOPs exactly.
    """
    model_args = dict(
        block=EPSABottleneck,
        layers=(3, 4, 6, 3),
        cardinality=32,
        base_width=4,
        block_args=_LARGE_PSA,
        zero_init_last=False,
    )
    return _create_epsanet('epsanet50_large', pretrained, **dict(model_args, **kwargs))


@register_model
def epsanet101_large(pretrained: bool = False, **kwargs) -> ResNet:
    """EPSANet-101 ("Large"), reconstructed from the paper's numbers: 49.59M params, 8.97 GMACs.

    The authors' code never contained this model; see ``epsanet50_large`` for the configuration.
    """
    model_args = dict(
        block=EPSABottleneck,
        layers=(3, 4, 23, 3),
        cardinality=32,
        base_width=4,
        block_args=_LARGE_PSA,
        zero_init_last=False,
    )
    return _create_epsanet('epsanet101_large', pretrained, **dict(model_args, **kwargs))
