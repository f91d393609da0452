"""Pyramid Squeeze Attention (PSA), the attention module of EPSANet

Several convolutions with growing kernels and groups look at the same input; one squeeze-excite module
scores every branch, and a softmax across the branches weighs them before they are concatenated.

Paper: `EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network`
    - https://arxiv.org/abs/2105.14447
"""

from collections import OrderedDict
from typing import List, Sequence, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SEModule

from ..ops import PSA_IMPLS, check_psa_impl, fast_layout, psa_branch_convs, same_padding

__all__ = ['PSA_IMPLS', 'PyramidSqueezeAttention']

# Leaves for FX tracing: their device / grad-mode choices are made when the graph runs, not when traced.
torch.fx.wrap('fast_layout')
torch.fx.wrap('psa_branch_convs')


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
        impl: How the forward is computed; every choice computes the same function (to float rounding) from the
            same parameters, and can be changed on a built module through the ``impl`` attribute.
            ``'fast'`` (default): :meth:`forward_fast`, its branch convolutions the fastest the device has
            (on CUDA, the Triton kernels or cuDNN, chosen by measurement per shape). ``'reference'``:
            :meth:`forward_reference`. ``'triton'``: :meth:`forward_fast` with the Triton kernels, an error
            where they cannot run (no Triton, not a CUDA tensor; ``TRITON_INTERPRET=1`` runs them on CPU).
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
        check_psa_impl(impl)
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
                padding=same_padding(k, dilation),
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

        * The input goes into the layout its device runs fastest (``ops.fast_layout``: channels_last on CPU on
          large maps and under autograd); the output keeps it, and later layers follow.
        * All branch convolutions come from one call, ``ops.psa_branch_convs``, which picks the implementation
          for the device (on CPU: depthwise forwards, grouped backwards and merged weight gradients).
        * The squeeze-excite module runs once, as matrix products, on the pooled features of all branches
          stacked on the batch axis, and the branches are concatenated once (in the authors' reversed order) and
          weighted in a single multiply.
        """
        x = fast_layout(x, self.conv_1.weight)
        weights: List[torch.Tensor] = []
        groups: List[int] = []
        for layer in self.values():
            if hasattr(layer, 'groups'):  # the branch convs, not 'se' (TorchScript resolves this per module)
                weights.append(layer.weight)
                groups.append(layer.groups)
        # (B, N * C, H, W), branches in the authors' concatenation order: last branch first.
        out = psa_branch_convs(x, weights, groups, self.conv_1.stride[0], self.conv_1.dilation[0], self.impl)

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
