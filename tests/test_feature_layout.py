"""Feature maps come back in the caller's memory format, the same in training and inference.

Inside, the fast path runs the stem and some blocks channels_last on CPU (by map size, batch and grad
mode); the maps handed back by ``features_only`` (every ``feature_cls``) and ``forward_intermediates`` are
in the input's layout: NCHW for an NCHW image, channels_last for a channels_last one. The truth is the
reference path, plain PyTorch ops that never change a layout: for an NCHW model the fast path must hand
back maps with the reference's layout and values. 112x112 images at batch 2 make stage 1 (28x28) run
channels_last at inference and stages 2-4 NCHW, so a model that returned maps as they ran would mix
layouts. About 30 s on 2 cores.
"""

import pytest
import timm
import torch

FEATURE_CLASSES = ['list', 'dict', 'hook', 'fx', 'getter']


def _maps(out):
    return list(out.values()) if isinstance(out, dict) else list(out)


def _layout(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return 'nchw'
    return 'channels_last' if t.is_contiguous(memory_format=torch.channels_last) else 'strided'


def _pair(**kwargs):
    """The fast model and the reference model, with the same weights (same seed, same construction)."""
    models = []
    for impl in ('fast', 'reference'):
        torch.manual_seed(0)
        models.append(timm.create_model('epsanet50', psa_impl=impl, **kwargs))
    return models


@pytest.mark.parametrize('feature_cls', FEATURE_CLASSES)
def test_features_only_in_caller_layout(feature_cls):
    """NCHW in, NCHW out, for every feature_cls: at inference (stage 1 ran channels_last) and under autograd
    in training (every stage ran channels_last)."""
    torch.manual_seed(0)
    model = timm.create_model('epsanet50', features_only=True, feature_cls=feature_cls)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        inference = _maps(model.eval()(x))
    training = _maps(model.train()(x))
    assert [_layout(f) for f in inference] == ['nchw'] * 5
    assert [_layout(f) for f in training] == ['nchw'] * 5
    assert [f.view(2, -1).shape[1] for f in training] == [f[0].numel() for f in inference]


def test_features_only_layout_and_values_follow_the_reference():
    """The reference path (plain PyTorch propagation) sets the layouts, for NCHW and channels_last images."""
    fast, reference = _pair(features_only=True)
    cases = [(torch.randn(2, 3, 112, 112), False, 'nchw'), (torch.randn(2, 3, 112, 112), True, 'nchw')]
    cases.append((torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last), False, 'channels_last'))
    for image, train, expected in cases:
        with torch.set_grad_enabled(train):
            got, want = _maps(fast.train(train)(image)), _maps(reference.train(train)(image))
        assert [_layout(f) for f in want] == [expected] * 5
        assert [_layout(f) for f in got] == [expected] * 5, (expected, train)
        for f, r in zip(got, want, strict=True):
            torch.testing.assert_close(f, r, rtol=1e-3, atol=1e-3)


def test_forward_intermediates_in_caller_layout():
    torch.manual_seed(0)
    model = timm.create_model('epsanet50')
    x = torch.randn(2, 3, 112, 112)
    for train in (False, True):  # at inference stage 1 ran channels_last; in training every stage did
        with torch.set_grad_enabled(train):
            final, intermediates = model.train(train).forward_intermediates(x)
            only = model.forward_intermediates(x, indices=(1, 2), intermediates_only=True)
        assert [_layout(f) for f in [final, *intermediates, *only]] == ['nchw'] * 8, train
        # what the layout broke before: viewing a map as (batch, -1)
        assert [f.view(2, -1).shape[1] for f in intermediates] == [f[0].numel() for f in intermediates]


def test_channels_last_model_keeps_channels_last():
    """A channels_last model fed channels_last images stays channels_last: no copies, the fastest path."""
    fast, _ = _pair(features_only=True)
    fast = fast.to(memory_format=torch.channels_last).eval()
    with torch.no_grad():
        maps = fast(torch.randn(2, 3, 112, 112).contiguous(memory_format=torch.channels_last))
    assert [_layout(f) for f in maps] == ['channels_last'] * 5


@pytest.mark.filterwarnings('ignore::FutureWarning')  # torch.jit.script is deprecated in torch 2.14
def test_scripted_features_only_in_caller_layout():
    """The layout hook is TorchScript too: the scriptable feature nets ('list', 'dict') stay scriptable."""
    model = timm.create_model('epsanet50', features_only=True).eval()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        maps = _maps(scripted(torch.randn(2, 3, 112, 112)))
    assert [_layout(f) for f in maps] == ['nchw'] * 5
