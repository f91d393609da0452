"""PyramidSqueezeAttention's contract: the fast forward computes what the reference forward computes.

The reference (``forward_reference``) is the plain formulation the golden tests tie to the authors'
code; here the fast path (``forward_fast``: layout switch, the ops' branch convolutions, batched
squeeze-excite) is checked against it: outputs and gradients to 1e-4 in float32, and to float64 rounding
in float64. ``tests/test_ops_cpu.py`` checks the CPU machinery behind it piece by piece.
"""

import pytest
import timm
import torch

from timm_epsanet import PyramidSqueezeAttention
from timm_epsanet.layers import pyramid_squeeze_attn

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


def test_impl_selection_and_state_dict():
    ref = timm.create_model('epsanet50', psa_impl='reference', device='meta')
    fast = timm.create_model('epsanet50', device='meta')
    psas = [m for m in ref.modules() if isinstance(m, PyramidSqueezeAttention)]
    assert len(psas) == 16 and all(m.impl == 'reference' for m in psas)
    assert all(m.impl == 'fast' for m in fast.modules() if isinstance(m, PyramidSqueezeAttention))
    # Same names and shapes: checkpoints are interchangeable between the two paths.
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in fast.state_dict().items()}
    with pytest.raises(ValueError, match="impl must be one of \\('fast', 'reference', 'triton'\\), got 'quick'"):
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
        assert pyramid_squeeze_attn.psa_branch_convs in targets and pyramid_squeeze_attn.fast_layout in targets
        torch.testing.assert_close(traced(x), expected, rtol=0, atol=TOL)
    # Scripted training takes plain autograd (TorchScript cannot call autograd Functions): same gradients.
    xs = [x.clone().requires_grad_() for _ in range(2)]
    scripted(xs[0]).square().sum().backward()
    ref(xs[1]).square().sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=0, atol=TOL)
