"""The CPU machinery behind the PSA fast path (``timm_epsanet.ops.psa_cpu``) against plain convolutions.

Depthwise re-expressions, grouped backwards, merged weight gradients and the layout plan the CPU
speed-ups rest on; the whole network's fast path against its reference path is in tests/test_models.py.
"""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from timm_epsanet.ops import psa_cpu

TOL = 1e-4


@pytest.mark.parametrize(
    'groups, out_chs, size, expect_depthwise',
    [
        (16, 16, 11, True),  # one output per group
        (8, 16, 11, True),  # two per group
        (4, 16, 11, False),  # four per group on few positions (2 x 11 x 13 < 1024): grouped kernel
        (4, 16, 24, True),  # ...on many (2 x 24 x 26) with a large kernel (9): depthwise
        (1, 16, 11, False),  # dense: untouched
    ],
)
@pytest.mark.parametrize('grad', [False, True], ids=['no_grad', 'grad'])
def test_branch_conv_rewrite_is_exact_and_taken(monkeypatch, groups, out_chs, size, expect_depthwise, grad):
    torch.manual_seed(0)
    x = torch.randn(2, 32, size, size + 2, requires_grad=grad)
    weight = torch.randn(out_chs, 32 // groups, 9, 9, requires_grad=grad)
    expected = F.conv2d(x, weight, None, [2, 2], [8, 8], [2, 2], groups)
    calls = []
    conv2d = F.conv2d

    def recording_conv2d(*args):
        calls.append(args[-1])  # groups
        return conv2d(*args)

    monkeypatch.setattr(psa_cpu.F, 'conv2d', recording_conv2d)
    with torch.set_grad_enabled(grad):
        out = psa_cpu.branch_conv(x, weight, [2, 2], [8, 8], [2, 2], groups)
    torch.testing.assert_close(out, expected, rtol=0, atol=TOL)
    # Under plain autograd the grouped conv is kept (the depthwise backward is slow); PSA modules pair the
    # depthwise forward with grouped backwards in PyramidBranchConvs instead.
    assert (calls[0] == 32) == (expect_depthwise and not grad), calls


# (in_chs, kernels, groups, stride, dilation, size, merged weight-gradient branches)
BRANCH_CONFIGS = {
    'layer1_all_merged': (64, (3, 5, 7, 9), (1, 4, 8, 16), 1, 1, 56, [1, 2, 3]),
    'layer2_pair_merged': (128, (3, 5, 7, 9), (1, 4, 8, 16), 1, 1, 16, [2, 3]),
    'strided_dilated_pair': (64, (3, 5, 7, 9), (1, 4, 8, 16), 2, 2, 29, [2, 3]),
    'large_all_merged': (128, (3, 5, 5, 7), (32, 32, 32, 32), 1, 1, 56, [0, 1, 2, 3]),
    'small_map_none': (64, (3, 5, 7, 9), (1, 4, 8, 16), 1, 1, 9, []),
}


@pytest.mark.parametrize('name', sorted(BRANCH_CONFIGS))
def test_pyramid_branch_convs_match_autograd(name):
    """Depthwise forwards, grouped backwards and merged weight gradients against plain grouped convs."""
    in_chs, kernels, groups, stride, dilation, size, merged = BRANCH_CONFIGS[name]
    out_size = (size - 1) // stride + 1
    assert psa_cpu._merged_weight_grad_branches(list(kernels), list(groups), out_size * out_size) == merged
    torch.manual_seed(0)
    x = torch.randn(2, in_chs, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    weights = [
        (torch.randn(in_chs // 4, in_chs // g, k, k) / math.sqrt(k * k * in_chs / g)).requires_grad_()
        for k, g in zip(kernels, groups, strict=True)
    ]
    outs = psa_cpu.PyramidBranchConvs.apply(x, list(groups), stride, dilation, *weights)
    expected = [
        F.conv2d(x, w, None, stride, dilation * (k - 1) // 2, dilation, g)
        for w, k, g in zip(weights, kernels, groups, strict=True)
    ]
    grad_outs = [torch.randn_like(e) for e in expected]
    got = torch.autograd.grad(outs, [x, *weights], grad_outs)
    want = torch.autograd.grad(expected, [x, *weights], grad_outs)
    for out, exp in zip(outs, expected, strict=True):
        torch.testing.assert_close(out, exp, rtol=0, atol=TOL)
    for g_f, g_r in zip(got, want, strict=True):
        assert g_f.shape == g_r.shape
        torch.testing.assert_close(g_f, g_r, rtol=0, atol=TOL * max(1.0, g_r.abs().max().item()))


def _stage_layouts(model, x):
    """'cl' or 'nchw' for the output of every stage of ``model`` on ``x``."""
    layouts = {}

    def record(name):
        def hook(module, args, out):
            layouts[name] = 'cl' if out.is_contiguous(memory_format=torch.channels_last) else 'nchw'

        return hook

    for name in ('layer1', 'layer2', 'layer3', 'layer4'):
        getattr(model, name).register_forward_hook(record(name))
    model(x)
    return layouts


def test_fast_path_layout_choices():
    """The layout plan of the fast path on CPU, which the benchmark's speed-ups rest on."""
    model = timm.create_model('epsanet50', num_classes=0).eval()
    assert isinstance(model.conv1, psa_cpu.ChannelsLastStemConv2d)
    assert type(timm.create_model('epsanet50', psa_impl='reference', device='meta').conv1) is torch.nn.Conv2d
    x = torch.randn(2, 3, 128, 160)  # stage maps 32x40, 16x20, 8x10, 4x5
    with torch.no_grad():
        # NCHW model at inference: maps of 28x28 and more channels_last, smaller ones back to NCHW...
        assert _stage_layouts(model, x) == {'layer1': 'cl', 'layer2': 'nchw', 'layer3': 'nchw', 'layer4': 'nchw'}
        # ...unless a single image makes too little work (32x40 < 2 x 28x28 positions).
        assert set(_stage_layouts(model, x[:1]).values()) == {'nchw'}
    # Under autograd everything runs channels_last (the grouped backward is much faster there).
    assert set(_stage_layouts(model, x).values()) == {'cl'}
    # A model put in channels_last stays channels_last.
    model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert set(_stage_layouts(model, x.contiguous(memory_format=torch.channels_last)).values()) == {'cl'}
