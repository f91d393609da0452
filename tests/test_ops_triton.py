"""The Triton branch-convolution kernels against the plain PyTorch reference, on CPU.

The kernels run in Triton's interpreter (``TRITON_INTERPRET=1``; ``psa_triton`` decorates its
kernels on first use, so setting the variable per test is enough). Outputs and gradients of fp32
inputs are compared with a float64 reference to 1e-5 relative (the interpreter computes fp32 dots
in fp32), fp16/bf16 to 1e-2. A second group of tests compiles every kernel with every autotune
config for sm_90 and sm_80 without a GPU, which catches what the interpreter lets through
(tl.dot's shape rules, shared memory). Cost on 2 cores: ~60 s interpreter, ~60 s compiles.
"""

import pytest
import torch

triton = pytest.importorskip('triton')

from timm_epsanet.ops import psa_triton  # noqa: E402
from timm_epsanet.ops.psa_triton import (  # noqa: E402
    psa_branch_convs_reference,
    psa_branch_convs_triton,
    triton_unavailable_reason,
)


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _weights(cin, couts, kernels, groups, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(c, cin // g, k, k, generator=gen, dtype=torch.float64) / (k * (cin // g) ** 0.5)
        for c, k, g in zip(couts, kernels, groups, strict=True)
    ]


def _check(x, weights, groups, stride, dilation, dtype, tol, channels_last=True):
    """Forward, input gradient and weight gradients of the kernels vs the float64 reference."""
    x = x.to(dtype)
    weights = [w.to(dtype) for w in weights]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xt = x.detach().requires_grad_()
    wt = [w.detach().requires_grad_() for w in weights]
    out = psa_branch_convs_triton(xt, wt, groups, stride, dilation)
    # The reference sees the same (rounded) inputs, in float64.
    xr = x.detach().double().requires_grad_()
    wr = [w.detach().double().requires_grad_() for w in weights]
    ref = psa_branch_convs_reference(xr, wr, groups, stride, dilation)

    assert out.dtype == dtype and out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert _rel(out, ref) < tol, f'forward {_rel(out, ref):.2e}'

    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    assert xt.grad.dtype == dtype and _rel(xt.grad, xr.grad) < tol, f'input grad {_rel(xt.grad, xr.grad):.2e}'
    for i, (a, b) in enumerate(zip(wt, wr, strict=True)):
        assert a.grad.shape == b.grad.shape and a.grad.dtype == dtype
        assert _rel(a.grad, b.grad) < tol, f'weight grad of branch {i}: {_rel(a.grad, b.grad):.2e}'


# (in channels, out channels per branch, kernels, groups, stride, dilation, (H, W)): every
# configuration the layer allows, each at the smallest size that still exercises it. EPSANet's own
# PSA (kernels 3/5/7/9, groups 1/4/8/16, stride 2) is test_psa_module_sized_call.
CASES = {
    # the Large variants: 32 groups (one channel per group) in every branch, kernels 3/5/5/7
    'large_32_groups': (32, [32, 32, 32, 32], [3, 5, 5, 7], [32, 32, 32, 32], 1, 1, (4, 5)),
    # output_stride 16 and 8: dilated branches, odd channel counts per group (3 in, 5 out)
    'dilation2': (12, [20, 20], [3, 5], [4, 2], 1, 2, (6, 5)),
    'dilation4_stride2': (8, [8, 8], [3, 5], [1, 8], 2, 4, (7, 6)),
    # several channel tiles and channel chunks per tap (dense 48 -> 40), groups of 24 channels
    'wide_dense': (48, [40, 40], [1, 3], [1, 2], 1, 1, (3, 4)),
    # any branch count: one branch and five
    'one_branch': (6, [9], [3], [3], 1, 1, (4, 4)),
    'five_branches': (8, [8, 8, 8, 8, 8], [1, 3, 3, 5, 3], [1, 2, 4, 8, 8], 2, 2, (5, 5)),
}
# Tile config index (into _gemm_configs / _dw_configs) and pixels per weight-gradient split per
# case: every small config runs somewhere, and some cases split the reduction (split-K).
TILING = {
    'large_32_groups': (2, 4096),
    'dilation2': (0, 16),
    'dilation4_stride2': (1, 4096),
    'wide_dense': (2, 8),
    'one_branch': (1, 5),
    'five_branches': (0, 4096),
}


@pytest.mark.parametrize('name', list(CASES))
def test_fp32_matches_reference(interpret, monkeypatch, name):
    cin, couts, kernels, groups, stride, dilation, (h, w) = CASES[name]
    config, pixels_per_split = TILING[name]
    for kernel in ('fwd', 'dx', 'dw'):
        monkeypatch.setitem(psa_triton._INTERPRETER_CONFIG, kernel, config)
    monkeypatch.setattr(psa_triton, '_DW_PIXELS_PER_SPLIT', pixels_per_split)
    x = torch.randn(2, cin, h, w, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    channels_last = list(CASES).index(name) % 2 == 0
    _check(x, _weights(cin, couts, kernels, groups), groups, stride, dilation, torch.float32, 1e-5, channels_last)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_matches_reference(interpret, dtype):
    cin, couts, kernels, groups, stride, dilation, (h, w) = CASES['dilation2']
    x = torch.randn(2, cin, h, w, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _check(x, _weights(cin, couts, kernels, groups), groups, stride, dilation, dtype, 1e-2)


def test_psa_module_sized_call(interpret):
    """A PSA module's call at EPSANet's proportions (branch width = width / 4), NCHW, stride 2."""
    groups = [1, 4, 8, 16]
    x = torch.randn(2, 16, 6, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _check(x, _weights(16, [16] * 4, [3, 5, 7, 9], groups), groups, 2, 1, torch.float32, 1e-5, channels_last=False)


def test_tf32_switch_picks_dot_precision(interpret, monkeypatch):
    seen = []
    launch = psa_triton._launch
    monkeypatch.setattr(psa_triton, '_launch', lambda *a, **k: seen.append(k['DOT_PRECISION']) or launch(*a, **k))
    x = torch.randn(2, 4, 3, 3)
    w = [torch.randn(4, 4, 3, 3)]
    for allow in (False, True):
        monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', allow)
        out = psa_branch_convs_triton(x, w, [1], 1, 1)
        torch.testing.assert_close(out, psa_branch_convs_reference(x, w, [1], 1, 1), rtol=1e-2, atol=1e-2)
    psa_branch_convs_triton(x.bfloat16(), [w[0].bfloat16()], [1], 1, 1)
    assert seen == ['ieee', 'tf32', 'tf32']


def test_autocast_casts_like_conv2d(interpret):
    x = torch.randn(2, 8, 4, 4)
    w = [torch.randn(8, 2, 3, 3)]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = psa_branch_convs_triton(x, w, [4], 1, 1)
        ref = psa_branch_convs_reference(x, w, [4], 1, 1)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert _rel(out, ref) < 1e-2


def test_bad_arguments_are_named(interpret):
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match='not an odd square kernel'):
        psa_branch_convs_triton(x, [torch.randn(8, 8, 2, 2)], [1], 1, 1)
    with pytest.raises(ValueError, match='3 groups does not fit 8 input channels'):
        psa_branch_convs_triton(x, [torch.randn(6, 2, 3, 3)], [3], 1, 1)
    with pytest.raises(ValueError, match='branch 0 weight is torch.float64'):
        psa_branch_convs_triton(x, [torch.randn(8, 8, 3, 3, dtype=torch.float64)], [1], 1, 1)


def test_unavailable_reason(monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    reason = triton_unavailable_reason(torch.device('cpu'))
    assert reason is not None and 'CUDA' in reason and 'TRITON_INTERPRET=1' in reason
    with pytest.raises(RuntimeError, match='cannot run: the Triton kernels run on CUDA devices'):
        psa_branch_convs_triton(torch.randn(1, 4, 3, 3), [torch.randn(4, 4, 3, 3)], [1], 1, 1)
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    assert triton_unavailable_reason(torch.device('cpu')) is None
    monkeypatch.setattr(psa_triton, 'triton', None)
    assert 'not installed' in triton_unavailable_reason(torch.device('cpu'))


class _Branches(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(w.float()) for w in _weights(8, [8, 8], [3, 5], [2, 8])]
        )

    def forward(self, x):
        return psa_branch_convs_triton(x, list(self.weights), [2, 8], 1, 1).relu()


def test_dynamo_traces_without_graph_breaks(interpret):
    module = _Branches()
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    explanation = torch._dynamo.explain(module)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_forward_and_backward_match_eager(interpret):
    """aot_eager runs the fake implementations (shapes, strides) and the autograd formula compiled."""
    torch._dynamo.reset()
    module = _Branches()
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    eager_x = x.clone().requires_grad_()
    module(eager_x).sum().backward()
    eager_grads = [eager_x.grad] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    compiled_x = x.clone().requires_grad_()
    torch.compile(module, backend='aot_eager', fullgraph=True)(compiled_x).sum().backward()
    for a, b in zip([compiled_x.grad] + [p.grad for p in module.parameters()], eager_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_custom_ops_pass_opcheck(interpret):
    """Schema, fake implementations and autograd registration agree with the real kernels."""
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    w = [torch.randn(4, 2, 3, 3)]
    grad = torch.randn(2, 4, 3, 3)
    # The backward ops have no autograd formula of their own (no double backward): check them without grads.
    torch.library.opcheck(psa_triton._psa_branch_convs_backward_input_op, (grad, x, w, [2], 1, 1, False))
    torch.library.opcheck(psa_triton._psa_branch_convs_backward_weight_op, (grad, x, w, [2], 1, 1, False))
    w = [w[0].requires_grad_()]
    torch.library.opcheck(psa_triton._psa_branch_convs_op, (x.requires_grad_(), w, [2], 1, 1, False))


# -------------------------------------------------------------------------------------------------
# Compiling for GPUs that are not here
# -------------------------------------------------------------------------------------------------

# Shared memory per block (bytes) that the prune must respect: H100 and A100.
_SHARED_LIMIT = {90: 232448, 80: 166912}


def _signature(fn, pointer_dtype, constexprs):
    types = {'meta_ptr': '*i32', 'dw_ptr': '*fp32'}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = 'constexpr'
        elif name.endswith('_ptr'):
            signature[name] = types.get(name, '*' + pointer_dtype)
        else:
            signature[name] = 'i32'
    return signature


@pytest.mark.parametrize('capability, dtype, precision', [(90, 'bf16', 'tf32'), (80, 'fp16', 'tf32')])
@pytest.mark.parametrize('kernel', ['fwd', 'dx', 'dw'])
def test_kernels_compile_for_gpu(monkeypatch, kernel, capability, dtype, precision):
    """Every autotune config of every kernel builds a cubin; where the prune keeps it, it fits the card."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    kernels = psa_triton._kernels(False)
    fn, configs = kernels[kernel], kernels[kernel + '_configs']
    elem = 4 if dtype == 'fp32' else 2
    a, b = (('BLOCK_CI', 'BLOCK_P'), ('BLOCK_P', 'BLOCK_CO')) if kernel == 'dw' else (
        ('BLOCK_M', 'BLOCK_K'), ('BLOCK_K', 'BLOCK_N'))  # fmt: skip
    for config in configs:
        constexprs = dict(STRIDE=2, DIL=1, DOT_PRECISION=precision, DOT_UPCAST=False, **config.kwargs)
        if kernel == 'dx':
            constexprs['TAP_STEP'] = 2
        source = ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs)
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        compiled = triton.compile(source, target=GPUTarget('cuda', capability, 32), options=options)
        assert compiled.asm['cubin'], config
        estimate = psa_triton._smem_bytes(config, elem, a, b)
        assert compiled.metadata.shared <= max(estimate, 1), (config, compiled.metadata.shared, estimate)
        if estimate <= _SHARED_LIMIT[capability]:
            assert compiled.metadata.shared <= _SHARED_LIMIT[capability]
