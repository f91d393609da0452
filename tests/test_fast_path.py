"""The fast PSA forward computes what the reference forward computes, and the benchmark CLI runs.

The reference (``forward_reference``) is the plain formulation the golden tests tie to the authors'
code; here the fast path (layout switch, depthwise re-expressions, batched squeeze-excite) is checked
against it: outputs and gradients to 1e-4 in float32, and to float64 rounding in float64.
"""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_epsanet.epsanet as epsanet
from timm_epsanet import PyramidSqueezeAttention
from timm_epsanet.benchmark import main as benchmark_main
from timm_epsanet.benchmark import memory_in_subprocess

TOL = 1e-4

# (in_chs, out_chs, kernels, groups, stride, dilation, size): EPSANet-50's stages (1, 2 and 4 outputs per
# group in the big branches), the Large variant's 32 groups, stride 2 on an odd map and dilation.
CONFIGS = {
    'layer1': (64, 64, (3, 5, 7, 9), (1, 4, 8, 16), 1, 1, 15),
    'layer2_s2_odd': (128, 128, (3, 5, 7, 9), (1, 4, 8, 16), 2, 1, 13),
    'layer3_dilated': (256, 256, (3, 5, 7, 9), (1, 4, 8, 16), 1, 2, 9),
    'large_layer1': (128, 128, (3, 5, 5, 7), (32, 32, 32, 32), 1, 1, 10),
}


def _pair(name, dtype=torch.float32):
    in_chs, out_chs, kernels, groups, stride, dilation, size = CONFIGS[name]
    torch.manual_seed(0)
    fast = PyramidSqueezeAttention(
        in_chs, out_chs, kernel_sizes=kernels, groups=groups, stride=stride, dilation=dilation
    ).to(dtype)
    ref = PyramidSqueezeAttention(
        in_chs, out_chs, kernel_sizes=kernels, groups=groups, stride=stride, dilation=dilation, impl='reference'
    ).to(dtype)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, in_chs, size, size + 2, dtype=dtype)  # non-square: catches H/W mix-ups
    return fast, ref, x


@pytest.mark.parametrize('name', sorted(CONFIGS))
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
def test_fast_equals_reference_no_grad(name, channels_last):
    fast, ref, x = _pair(name)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = ref(x)
        out = fast(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_fast_equals_reference_gradients(name):
    fast, ref, x = _pair(name)
    grad_out = None
    results = []
    for module in (ref, fast):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        out.backward(grad_out)
        results.append((out, xi.grad, [p.grad for p in module.parameters()]))
    (out_r, gx_r, gp_r), (out_f, gx_f, gp_f) = results
    torch.testing.assert_close(out_f, out_r, rtol=0, atol=TOL)
    torch.testing.assert_close(gx_f, gx_r, rtol=0, atol=TOL)
    for g_f, g_r in zip(gp_f, gp_r, strict=True):
        torch.testing.assert_close(g_f, g_r, rtol=0, atol=TOL * max(1.0, g_r.abs().max().item()))


@pytest.mark.parametrize('grad', [False, True], ids=['no_grad', 'grad'])
def test_fast_equals_reference_float64(grad):
    """In float64 the two paths differ only by summation order (~1e-15), so any real slip shows."""
    fast, ref, x = _pair('layer1', torch.float64)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(fast(x), ref(x), rtol=0, atol=1e-12)


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

    monkeypatch.setattr(epsanet.F, 'conv2d', recording_conv2d)
    with torch.set_grad_enabled(grad):
        out = epsanet._branch_conv(x, weight, [2, 2], [8, 8], [2, 2], groups)
    torch.testing.assert_close(out, expected, rtol=0, atol=TOL)
    # Under plain autograd the grouped conv is kept (the depthwise backward is slow); PSA modules pair the
    # depthwise forward with grouped backwards in _PyramidBranchConvs instead.
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
    assert epsanet._merged_weight_grad_branches(list(kernels), list(groups), out_size * out_size) == merged
    torch.manual_seed(0)
    x = torch.randn(2, in_chs, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    weights = [
        (torch.randn(in_chs // 4, in_chs // g, k, k) / math.sqrt(k * k * in_chs / g)).requires_grad_()
        for k, g in zip(kernels, groups, strict=True)
    ]
    outs = epsanet._PyramidBranchConvs.apply(x, list(groups), stride, dilation, *weights)
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
    assert isinstance(model.conv1, epsanet._ChannelsLastStemConv2d)
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


def test_model_fast_equals_reference():
    """Whole network, NCHW input: float32 logits to 1e-4, and float64 parameter gradients to rounding.

    Gradients are compared in float64 because in float32 the layout switch's rounding (~1e-7) can flip a
    ReLU whose input is that close to zero, which moves single gradient entries by ~1e-4.
    """
    torch.manual_seed(0)
    fast = timm.create_model('epsanet50', num_classes=10).eval()
    ref = timm.create_model('epsanet50', num_classes=10, psa_impl='reference').eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 64, 72)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=0, atol=TOL)
    for model in (fast.double(), ref.double()):
        model(x.double()).logsumexp(dim=1).sum().backward()
    for (name, p_f), p_r in zip(fast.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p_f.grad, p_r.grad, rtol=0, atol=1e-10, msg=name)


def test_impl_selection_and_state_dict():
    ref = timm.create_model('epsanet50', psa_impl='reference', device='meta')
    fast = timm.create_model('epsanet50', device='meta')
    psas = [m for m in ref.modules() if isinstance(m, PyramidSqueezeAttention)]
    assert len(psas) == 16 and all(m.impl == 'reference' for m in psas)
    assert all(m.impl == 'fast' for m in fast.modules() if isinstance(m, PyramidSqueezeAttention))
    # Same names and shapes: checkpoints are interchangeable between the two paths.
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in fast.state_dict().items()}
    with pytest.raises(ValueError, match="impl must be one of \\('fast', 'reference'\\), got 'quick'"):
        PyramidSqueezeAttention(64, 64, impl='quick')
    with pytest.raises(ValueError, match='impl must be one of'):
        timm.create_model('epsanet50', psa_impl='quick', device='meta')


def test_fast_path_never_changes_parameters():
    """The layout switch is on activations only: parameters stay NCHW-contiguous (safetensors needs that)."""
    fast, _, x = _pair('layer1')
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    out = fast(x)
    out.sum().backward()
    for k, v in fast.state_dict().items():
        assert v.is_contiguous() and torch.equal(v, before[k]), k
    # On CPU the output comes out channels_last (same values); the caller's layout is not required.
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_fast_path_scripts_and_traces():
    fast, ref, x = _pair('layer2_s2_odd')
    with torch.no_grad():
        expected = ref(x)
        scripted = torch.jit.script(fast)
        torch.testing.assert_close(scripted(x), expected, rtol=0, atol=TOL)
        traced = torch.fx.symbolic_trace(fast)
        # The device / grad-mode dependent helpers are FX leaves, decided when the graph runs.
        targets = {n.target for n in traced.graph.nodes if n.op == 'call_function'}
        assert epsanet._psa_branches in targets and epsanet._fast_layout in targets
        torch.testing.assert_close(traced(x), expected, rtol=0, atol=TOL)
    # Scripted training takes plain autograd (TorchScript cannot call autograd Functions): same gradients.
    xs = [x.clone().requires_grad_() for _ in range(2)]
    scripted(xs[0]).square().sum().backward()
    ref(xs[1]).square().sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=0, atol=TOL)


def test_benchmark_cli_smoke(capsys):
    """Tiny run of ``python -m timm_epsanet.benchmark``: tables with ratios, progress on stderr."""
    results = benchmark_main(
        [
            '--models',
            'epsanet50,epsanet50:reference',
            '--modes',
            'infer,train',
            '--batch-sizes',
            '1',
            '--train-batch-sizes',
            '2',
            '--formats',
            'nchw',
            '--img-size',
            '32',
            '--rounds',
            '1',
            '--warmup',
            '0',
            '--no-memory',
        ]
    )
    out, err = capsys.readouterr()
    assert 'CPU:' in out and 'torch threads' in out
    assert '### infer batch 1 nchw' in out and '### train batch 2 nchw' in out
    assert '| epsanet50:reference |' in out and '1.00x / 1.00x' in out
    assert 'round 1/1' in err
    timings = results['train batch 2 nchw']['epsanet50']
    assert len(timings.wall) == 1 and timings.wall[0] > 0


def test_benchmark_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        benchmark_main(['--models', 'resnet50:reference'])
    assert 'only EPSANet models' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark_main(['--formats', 'nhwc'])
    assert "unknown format 'nhwc'" in capsys.readouterr().err


def test_training_peak_memory_probe():
    """The probe as the benchmark runs it: in a fresh interpreter, where the steps' activations must show."""
    mem = memory_in_subprocess('epsanet50', 2, 32, 'nchw', 'cpu', 1)
    assert math.isfinite(mem['rss']) and mem['rss'] > 0
    # The step's tensors at least hold the parameters' gradients (epsanet50: 22.6M float32 values).
    assert mem['tensors'] > 22.5e6 * 4 / 2**20
