"""The cuDNN formulations of the PSA branch convolutions and the measured choice between implementations.

Runs on CPU: the grouped and densified formulations are checked in float64 against the branch convolutions a
``PyramidSqueezeAttention`` builds (what ``forward_reference`` runs), outputs and gradients; the chooser is
driven by an injected fake timer, never by real timings. Cost: about 2 s.
"""

import warnings

import pytest
import torch

from timm_epsanet import PyramidSqueezeAttention
from timm_epsanet.ops import psa_cuda
from timm_epsanet.ops.psa_cuda import (
    block_diagonal_weight,
    branch_convs_key,
    choose,
    psa_branch_convs_densified,
    psa_branch_convs_grouped,
)

# (in_chs, out_chs, kernels, groups, stride, dilation, size): EPSANet's pyramid, stride 2 on an odd map,
# dilation 2 and 4 (output_stride 16 / 8), the Large variant's 32 groups, one and two branches.
CONFIGS = {
    'pyramid': (32, 64, (3, 5, 7, 9), (1, 4, 8, 16), 1, 1, 9),
    'pyramid_s2_odd': (32, 64, (3, 5, 7, 9), (1, 4, 8, 16), 2, 1, 9),
    'pyramid_dilation2': (32, 64, (3, 5, 7, 9), (1, 4, 8, 16), 1, 2, 8),
    'pyramid_dilation4_s2': (16, 32, (3, 5, 7, 9), (1, 2, 4, 8), 2, 4, 11),
    'large': (32, 128, (3, 5, 7, 9), (32, 32, 32, 32), 1, 1, 6),
    'one_branch': (8, 8, (5,), (4,), 1, 1, 7),
    'two_branches_s2': (16, 32, (3, 7), (2, 8), 2, 1, 8),
}
IMPLS = {'grouped': psa_branch_convs_grouped, 'densified': psa_branch_convs_densified}


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    """Every test starts with no measured choice and nothing forced."""
    monkeypatch.delenv(psa_cuda.FORCE_ENV, raising=False)
    psa_cuda.clear_choices()
    psa_cuda.force(None)
    yield
    psa_cuda.clear_choices()
    psa_cuda.force(None)


def _psa(name: str) -> PyramidSqueezeAttention:
    in_chs, out_chs, kernels, groups, stride, dilation, _ = CONFIGS[name]
    torch.manual_seed(0)
    return PyramidSqueezeAttention(in_chs, out_chs, kernels, groups, stride, dilation, rd_ratio=0.25).double()


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'cl'])
@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('name', CONFIGS)
def test_branch_convs_match_the_layers_convs(name, impl, channels_last):
    """Outputs and gradients (input and every grouped weight) equal the PSA module's own convs, float64."""
    psa = _psa(name)
    size = CONFIGS[name][-1]
    convs = [psa[f'conv_{i + 1}'] for i in range(psa.num_branches)]
    x = torch.randn(2, CONFIGS[name][0], size, size + 1, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_out = None

    # Reference: each branch through its nn.Conv2d, concatenated last branch first as the module does.
    x_ref = x.clone().requires_grad_()
    ref = torch.cat([conv(x_ref) for conv in reversed(convs)], dim=1)
    grad_out = torch.randn_like(ref)
    ref.backward(grad_out)
    ref_grads = [conv.weight.grad.clone() for conv in convs]
    psa.zero_grad(set_to_none=True)

    x_new = x.clone().requires_grad_()
    weights = [conv.weight for conv in convs]
    out = IMPLS[impl](x_new, weights, [c.groups for c in convs], convs[0].stride[0], convs[0].dilation[0])
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.backward(grad_out)
    torch.testing.assert_close(x_new.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    for conv, ref_grad in zip(convs, ref_grads, strict=True):
        assert conv.weight.grad.shape == conv.weight.shape
        torch.testing.assert_close(conv.weight.grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_block_diagonal_weight_layout_and_exact_gradient():
    """Each group's block sits on the diagonal, zeros elsewhere; the gradient is the dense one's diagonal blocks."""
    torch.manual_seed(0)
    groups, out_chs, in_chs = 4, 8, 12
    w = torch.randn(out_chs, in_chs // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    dense = block_diagonal_weight(w, groups)
    assert dense.shape == (out_chs, in_chs, 3, 3)
    o, i = out_chs // groups, in_chs // groups
    for g in range(groups):
        for h in range(groups):
            block = dense[g * o : (g + 1) * o, h * i : (h + 1) * i]
            expected = w[g * o : (g + 1) * o] if g == h else torch.zeros_like(block)
            assert torch.equal(block, expected)
    grad = torch.randn_like(dense)
    dense.backward(grad)
    expected_grad = torch.cat([grad[g * o : (g + 1) * o, g * i : (g + 1) * i] for g in range(groups)])
    assert torch.equal(w.grad, expected_grad)
    assert block_diagonal_weight(w, 1) is w


def _fake_timer(seconds, calls):
    """A timer that returns fixed times per candidate and logs (name, training) of each call."""
    names = {}

    def timer(fn, args, training):
        name = names.setdefault(fn, fn.__name__)
        calls.append((name, training))
        if isinstance(seconds[name], Exception):
            raise seconds[name]
        return seconds[name]

    return timer


def _candidates(*names):
    def make(n):
        def fn(*args):
            return n

        fn.__name__ = n
        return fn

    return {n: make(n) for n in names}


def _args(requires_grad=False):
    x = torch.randn(1, 4, 5, 5, requires_grad=requires_grad)
    return (x, [torch.randn(4, 4, 3, 3)], [1], 1, 1)


def test_choose_picks_the_fastest_and_caches_per_key():
    calls = []
    timer = _fake_timer({'triton': 3.0, 'cudnn_grouped': 1.0, 'cudnn_densified': 2.0}, calls)
    cands = _candidates('triton', 'cudnn_grouped', 'cudnn_densified')
    args = _args()
    key = branch_convs_key(*args)
    assert choose(key, cands, args, timer=timer) == 'cudnn_grouped'
    assert [c[0] for c in calls] == ['triton', 'cudnn_grouped', 'cudnn_densified']
    # Cached: no new measurement for the same key, even with a timer that would now say otherwise.
    assert choose(key, cands, args, timer=_fake_timer({'triton': 0.0}, calls)) == 'cudnn_grouped'
    assert len(calls) == 3
    table = psa_cuda.choices()
    assert table[key].name == 'cudnn_grouped' and table[key].seconds['triton'] == 3.0
    assert 'cudnn_grouped' in psa_cuda.format_choices() and key.describe() in psa_cuda.format_choices()

    # Another key (another shape) is measured again, and may choose differently.
    other = (torch.randn(1, 4, 6, 6), *args[1:])
    timer2 = _fake_timer({'triton': 0.5, 'cudnn_grouped': 1.0, 'cudnn_densified': 2.0}, calls)
    assert choose(branch_convs_key(*other), cands, other, timer=timer2) == 'triton'
    assert len(calls) == 6 and len(psa_cuda.choices()) == 2
    # Ties go to the dispatcher's first preference.
    assert choose('tie', cands, args, timer=_fake_timer(dict.fromkeys(cands, 1.0), calls)) == 'triton'


def test_key_and_timing_follow_autograd_recording():
    """Training calls are timed with their backward (training=True) and keyed apart from inference calls."""
    calls = []
    timer = _fake_timer({'a': 1.0, 'b': 2.0}, calls)
    args = _args(requires_grad=True)
    key_train = branch_convs_key(*args)
    choose(key_train, _candidates('a', 'b'), args, timer=timer)
    with torch.no_grad():
        key_infer = branch_convs_key(*args)
        choose(key_infer, _candidates('a', 'b'), args, timer=timer)
    assert key_train.recording and not key_infer.recording and key_train != key_infer
    assert calls == [('a', True), ('b', True), ('a', False), ('b', False)]


def test_key_follows_autocast_dtype_and_layout():
    x, *rest = _args()
    plain = branch_convs_key(x, *rest)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        autocast = branch_convs_key(x, *rest)
    cl = branch_convs_key(x.contiguous(memory_format=torch.channels_last), *rest)
    assert (plain.dtype, autocast.dtype) == ('float32', 'bfloat16')
    assert (plain.memory_format, cl.memory_format) == ('nchw', 'channels_last')


def test_choose_survives_a_raising_candidate():
    calls = []
    timer = _fake_timer({'triton': RuntimeError('no kernel for sm_75\nmore'), 'cudnn_grouped': 2.0}, calls)
    args = _args()
    with pytest.warns(UserWarning, match="'triton' failed while being timed"):
        assert choose('k', _candidates('triton', 'cudnn_grouped'), args, timer=timer) == 'cudnn_grouped'
    assert psa_cuda.choices()['k'].errors == {'triton': 'RuntimeError: no kernel for sm_75'}
    assert 'failed' in psa_cuda.format_choices()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(RuntimeError, match='Every PSA candidate failed'):
            choose('k2', _candidates('triton'), args, timer=timer)


def test_force_by_function_and_environment(monkeypatch):
    calls = []
    timer = _fake_timer({'triton': 1.0, 'cudnn_densified': 2.0}, calls)
    cands = _candidates('triton', 'cudnn_densified')
    monkeypatch.setenv(psa_cuda.FORCE_ENV, 'cudnn_densified')
    assert choose('k', cands, _args(), timer=timer) == 'cudnn_densified'
    psa_cuda.force('triton')  # the function wins over the environment
    assert choose('k', cands, _args(), timer=timer) == 'triton'
    assert calls == [] and psa_cuda.choices() == {}
    psa_cuda.force('cudnn_grouped')
    with pytest.raises(ValueError, match="'cudnn_grouped' is forced .* candidates: triton, cudnn_densified"):
        choose('k', cands, _args(), timer=timer)
    psa_cuda.force(None)
    monkeypatch.delenv(psa_cuda.FORCE_ENV)
    assert choose('k', cands, _args(), timer=timer) == 'triton' and len(calls) == 2


def test_no_measurement_while_compiling(monkeypatch):
    """While torch.compile traces: the cached choice, or the first candidate; nothing is timed or cached."""
    calls = []
    timer = _fake_timer({'a': 2.0, 'b': 1.0}, calls)
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    assert choose('k', _candidates('a', 'b'), _args(), timer=timer) == 'a'
    assert calls == [] and psa_cuda.choices() == {}
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: False)
    assert choose('k', _candidates('a', 'b'), _args(), timer=timer) == 'b'
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    assert choose('k', _candidates('a', 'b'), _args(), timer=timer) == 'b'
    assert len(calls) == 2


def test_measure_times_forward_and_backward_without_touching_gradients():
    """The real timer on CPU: runs the backward on detached copies, so parameters' .grad stay unset."""
    seen = []

    def candidate(x, weights, groups, stride, dilation):
        seen.append((x.requires_grad, torch.is_grad_enabled()))
        return psa_branch_convs_grouped(x, weights, groups, stride, dilation)

    w = torch.nn.Parameter(torch.randn(4, 4, 3, 3))
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    seconds = psa_cuda.measure(candidate, (x, [w], [1], 1, 1), training=True, warmup=1, reps=3)
    assert seconds > 0 and len(seen) == 4 and all(s == (True, True) for s in seen)
    assert x.grad is None and w.grad is None


def test_cuda_event_timing_with_fake_events():
    """The CUDA path's arithmetic: one event per call boundary, median of the gaps, milliseconds to seconds."""
    clock = [0.0]
    log = []

    class FakeEvent:
        def __init__(self, enable_timing):
            assert enable_timing
            self.t = None

        def record(self):
            self.t = clock[0]

        def synchronize(self):
            log.append('sync')

        def elapsed_time(self, end):
            return end.t - self.t  # in ms, as torch.cuda.Event

    durations = iter([5.0, 1.0, 2.0])

    def run():
        clock[0] += next(durations)

    assert psa_cuda._time_with_events(run, 3, FakeEvent) == pytest.approx(2.0e-3)
    assert log == ['sync']
