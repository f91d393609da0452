"""On a CUDA GPU: the PSA implementations at EPSANet's real shapes, and the models on the default path.

Skipped without CUDA (CI and the development machines have none); on a GPU machine run
``python -m pytest tests/test_gpu.py`` before ``python -m timm_epsanet.benchmark --gpu-targets``. The
Triton kernels with fp32 inputs and TF32 off must match a float64 reference to 1e-5 relative (outputs and
both gradients), fp16/bf16 to 1e-2; every implementation the default path may choose must too.
"""

import pytest
import timm
import torch

from timm_epsanet.ops import psa_cuda, psa_triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

# (in_chs, branch_chs, kernels, groups, map size, stride, dilation): EPSANet-50's four stages (first blocks
# stride 2 from stage 2 on), the Large variant's 32 groups, and output_stride=8's dilation.
SHAPES = {
    'stage1': (64, 16, (3, 5, 7, 9), (1, 4, 8, 16), 56, 1, 1),
    'stage2_s2': (128, 32, (3, 5, 7, 9), (1, 4, 8, 16), 56, 2, 1),
    'stage3': (256, 64, (3, 5, 7, 9), (1, 4, 8, 16), 14, 1, 1),
    'stage4': (512, 128, (3, 5, 7, 9), (1, 4, 8, 16), 7, 1, 1),
    'large_stage1': (128, 32, (3, 5, 5, 7), (32, 32, 32, 32), 56, 1, 1),
    'stage4_dilated4': (512, 128, (3, 5, 7, 9), (1, 4, 8, 16), 28, 1, 4),
}
IMPLS = {
    'triton': psa_triton.psa_branch_convs_triton,
    'cudnn_grouped': psa_cuda.psa_branch_convs_grouped,
    'cudnn_densified': psa_cuda.psa_branch_convs_densified,
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def no_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)


@pytest.mark.parametrize('impl', sorted(IMPLS))
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16], ids=['fp32', 'bf16', 'fp16'])
@pytest.mark.parametrize('shape', sorted(SHAPES))
@pytest.mark.parametrize('channels_last', [True, False], ids=['cl', 'nchw'])
def test_branch_convs_match_float64_reference(no_tf32, impl, dtype, shape, channels_last):
    if impl == 'triton' and psa_triton.triton_unavailable_reason(torch.device('cuda')) is not None:
        pytest.skip(psa_triton.triton_unavailable_reason(torch.device('cuda')))
    in_chs, branch_chs, kernels, groups, size, stride, dilation = SHAPES[shape]
    gen = torch.Generator(device='cuda').manual_seed(0)
    x = torch.randn(8, in_chs, size, size, device='cuda', generator=gen).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weights = [
        (torch.randn(branch_chs, in_chs // g, k, k, device='cuda', generator=gen) / (k * (in_chs / g) ** 0.5)).to(dtype)
        for k, g in zip(kernels, groups, strict=True)
    ]
    xs = x.detach().requires_grad_()
    ws = [w.detach().requires_grad_() for w in weights]
    out = IMPLS[impl](xs, ws, list(groups), stride, dilation)
    xr = x.detach().double().requires_grad_()
    wr = [w.detach().double().requires_grad_() for w in weights]
    ref = psa_triton.psa_branch_convs_reference(xr, wr, list(groups), stride, dilation)
    grad = torch.randn(ref.shape, device='cuda', generator=gen, dtype=torch.float64)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.shape == ref.shape and out.dtype == dtype
    assert _rel(out, ref) < tol, f'output {_rel(out, ref):.2e}'
    # Gradients of half-precision inputs are rounded once more (the incoming gradient).
    tol_grad = tol if dtype == torch.float32 else 2e-2
    assert _rel(xs.grad, xr.grad) < tol_grad, f'input gradient {_rel(xs.grad, xr.grad):.2e}'
    for i, (w, w_ref) in enumerate(zip(ws, wr, strict=True)):
        assert _rel(w.grad, w_ref.grad) < tol_grad, f'weight gradient {i} {_rel(w.grad, w_ref.grad):.2e}'


@pytest.mark.parametrize('name', ['epsanet50', 'epsanet50_large'])
@pytest.mark.parametrize('psa_impl', ['fast', 'triton'])
def test_model_on_gpu_matches_reference_path(no_tf32, name, psa_impl):
    """Whole network on CUDA, fp32 without TF32: logits to 1e-4, and a bf16 autocast training step is finite."""
    if psa_impl == 'triton' and psa_triton.triton_unavailable_reason(torch.device('cuda')) is not None:
        pytest.skip(psa_triton.triton_unavailable_reason(torch.device('cuda')))
    torch.manual_seed(0)
    model = timm.create_model(name, psa_impl=psa_impl, num_classes=10).cuda().eval()
    reference = timm.create_model(name, psa_impl='reference', num_classes=10).cuda().eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 160, 160, device='cuda').contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-4)
    model.train()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(dim=1).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
