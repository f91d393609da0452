"""``impl='triton'`` through the layer and the model: selection, refusals, and a whole network in the interpreter.

The kernels themselves are checked against the reference in tests/test_ops_triton.py. Here: an explicit
request says why it cannot run; the default never picks Triton on CPU; and an EPSANet-50 built with
``psa_impl='triton'`` traces under ``torch.compile`` without a graph break and computes what its reference
path computes, forward and backward. The network is EPSANet-50 with one block per stage and a quarter
of the PSA width (Triton's interpreter runs the full width at a minute per module); cost ~40 s on 2 cores.
"""

import pytest
import timm
import torch

triton = pytest.importorskip('triton')

import timm_epsanet.ops as ops  # noqa: E402
from timm_epsanet import PyramidSqueezeAttention  # noqa: E402
from timm_epsanet.ops import psa_triton  # noqa: E402

# EPSANet-50's stages and kernel pyramid, one block each, bottleneck width / 4 (branch widths 4 to 32).
NARROW = dict(
    num_classes=4,
    layers=(1, 1, 1, 1),
    base_width=16,
    block_args=dict(psa_kernels=(3, 5, 7, 9), psa_groups=(1, 2, 4, 4), psa_rd_ratio=0.25),
)


def test_explicit_triton_on_cpu_says_why(monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    psa = PyramidSqueezeAttention(64, 64, groups=(1, 2, 4, 8), impl='triton')
    with pytest.raises(RuntimeError, match="'triton' cannot run on this cpu tensor: .*TRITON_INTERPRET=1"):
        psa(torch.randn(1, 64, 6, 6))
    # The attribute switch reaches the same check.
    psa = PyramidSqueezeAttention(64, 64, groups=(1, 2, 4, 8))
    psa.impl = 'triton'
    with pytest.raises(RuntimeError, match="'triton' cannot run"):
        psa(torch.randn(1, 64, 6, 6))
    model = timm.create_model('epsanet50', psa_impl='triton', **NARROW)
    with pytest.raises(RuntimeError, match="'triton' cannot run"):
        model(torch.randn(1, 3, 32, 32))


def test_without_triton_explicit_requests_fail_and_fast_falls_back(monkeypatch):
    monkeypatch.setattr(psa_triton, 'triton', None)
    with pytest.raises(RuntimeError, match='needs Triton, which is not installed'):
        PyramidSqueezeAttention(64, 64, groups=(1, 2, 4, 8), impl='triton')
    with pytest.raises(RuntimeError, match='needs Triton, which is not installed'):
        timm.create_model('epsanet50', psa_impl='triton', device='meta')
    # The default path on CUDA then chooses between cuDNN's formulations only, quietly.
    assert list(ops._cuda_candidates(torch.device('cuda'))) == ['cudnn_grouped', 'cudnn_densified']


def test_cuda_candidates_put_triton_first_where_it_runs(monkeypatch):
    monkeypatch.setattr(psa_triton, 'triton_unavailable_reason', lambda device: None)
    assert list(ops._cuda_candidates(torch.device('cuda'))) == ['triton', 'cudnn_grouped', 'cudnn_densified']


def test_fast_never_picks_triton_on_cpu(monkeypatch):
    """Even where the interpreter could run the kernels, the CPU default keeps its own machinery."""
    monkeypatch.setenv('TRITON_INTERPRET', '1')

    def refuse(*args, **kwargs):
        raise AssertionError('the Triton kernels ran on CPU by default')

    monkeypatch.setattr(psa_triton, 'psa_branch_convs_triton', refuse)
    psa = PyramidSqueezeAttention(64, 64, groups=(1, 2, 4, 8))
    x = torch.randn(2, 64, 6, 6, requires_grad=True)
    psa(x).sum().backward()
    with torch.no_grad():
        psa(x)


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)


def test_model_with_triton_kernels_compiles_whole_and_matches_reference(interpret):
    """One graph under ``torch.compile(fullgraph=True)`` (a graph break would raise), and logits and every
    parameter's gradient of that compiled Triton path against the reference path in float64."""
    torch.manual_seed(0)
    model = timm.create_model('epsanet50', psa_impl='triton', **NARROW).eval()
    reference = timm.create_model('epsanet50', psa_impl='reference', **NARROW).eval().double()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    torch._dynamo.reset()
    out = torch.compile(model, backend='eager', fullgraph=True)(x)
    out.logsumexp(dim=1).sum().backward()
    expected = reference(x.double())
    expected.logsumexp(dim=1).sum().backward()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        err = ((p.grad.double() - p_ref.grad).norm() / p_ref.grad.norm().clamp_min(1e-30)).item()
        assert err < 1e-3, f'{name}: relative gradient error {err:.2e}'
