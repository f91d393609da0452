"""EPSANet as a backbone: feature extraction, output strides, intermediates and head/classifier API.

Behaviour is checked against the stage outputs of a plain ``model(x)`` (captured with forward hooks)
of the same weights, at 64-97 px. Costs about 30 s on 2 CPU cores.
"""

import copy
import math
from typing import Dict, List

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

from timm_epsanet import PyramidSqueezeAttention

from official_weights import deterministic_state_dict

MODELS = ['epsanet50', 'epsanet101', 'epsanet50_large', 'epsanet101_large']
CHANNELS = [64, 256, 512, 1024, 2048]
STAGES = ['act1', 'layer1', 'layer2', 'layer3', 'layer4']  # the modules behind feature indices 0..4
REDUCTIONS = {32: [2, 4, 8, 16, 32], 16: [2, 4, 8, 16, 16], 8: [2, 4, 8, 8, 8]}


def create(name: str = 'epsanet50', **kwargs) -> nn.Module:
    """A model with the fixed deterministic weights, loaded through timm's own pretrained path."""
    overlay = dict(state_dict=deterministic_state_dict(name))
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()


def stage_outputs(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """Outputs of the stem and the four stages during a plain classifier forward."""
    captured: Dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o.clone()))
        for n in STAGES
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return [captured[n] for n in STAGES]


def assert_same(actual: List[torch.Tensor], expected: List[torch.Tensor], atol: float = 1e-5) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, atol=atol, rtol=1e-5)


@pytest.fixture(scope='module')
def model50() -> nn.Module:
    return create('epsanet50')


@pytest.fixture(scope='module')
def image() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope='module')
def reference(model50, image) -> List[torch.Tensor]:
    return stage_outputs(model50, image)


# --- feature_info ----------------------------------------------------------------------------------


@pytest.mark.parametrize('name', MODELS)
def test_feature_info_all_models(name):
    backbone = timm.create_model(name, features_only=True, device='meta')
    assert backbone.feature_info.channels() == CHANNELS
    assert backbone.feature_info.reduction() == REDUCTIONS[32]
    assert backbone.feature_info.module_name() == STAGES
    # The classifier model describes the same pyramid, and its widest stage feeds the head.
    model = timm.create_model(name, device='meta')
    assert [f['num_chs'] for f in model.feature_info] == CHANNELS
    assert model.num_features == 2048


@pytest.mark.parametrize('name', MODELS)
def test_features_forward_all_models(name):
    """Real tensors of every model have the advertised channels and sizes (random init, 64 px)."""
    torch.manual_seed(0)
    backbone = timm.create_model(name, features_only=True).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == CHANNELS
    assert [f.shape[-1] for f in feats] == [64 // r for r in REDUCTIONS[32]]
    assert all(torch.isfinite(f).all() for f in feats)


@pytest.mark.parametrize('output_stride', [16, 8])
@pytest.mark.parametrize('name', MODELS)
def test_feature_info_output_stride(name, output_stride):
    backbone = timm.create_model(name, features_only=True, output_stride=output_stride, device='meta')
    assert backbone.feature_info.reduction() == REDUCTIONS[output_stride]
    assert backbone.feature_info.channels() == CHANNELS


# --- features_only extractors ----------------------------------------------------------------------


@pytest.mark.parametrize('feature_cls', ['list', 'dict', 'hook', 'fx', 'getter'])
@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3, 4), (1, 2, 3, 4), (0, 2), (3,)])
def test_features_only_matches_plain_forward(feature_cls, out_indices, image, reference):
    backbone = create(features_only=True, out_indices=out_indices, feature_cls=feature_cls)
    assert backbone.feature_info.channels() == [CHANNELS[i] for i in out_indices]
    assert backbone.feature_info.reduction() == [REDUCTIONS[32][i] for i in out_indices]
    with torch.no_grad():
        feats = backbone(image)
    if feature_cls == 'dict':
        assert list(feats) == [str(i) for i in out_indices]
        feats = list(feats.values())
    assert_same(feats, [reference[i] for i in out_indices])


def test_features_only_negative_indices(image, reference):
    backbone = create(features_only=True, out_indices=(-2, -1))
    assert backbone.feature_info.channels() == [1024, 2048]
    with torch.no_grad():
        assert_same(backbone(image), reference[3:])


# --- output_stride 16 / 8 (dilated PSA branches) ---------------------------------------------------


@pytest.mark.parametrize('output_stride', [16, 8])
def test_output_stride_shapes(output_stride):
    backbone = create(features_only=True, output_stride=output_stride)
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        feats = backbone(x)
    for f, r, c in zip(feats, REDUCTIONS[output_stride], CHANNELS, strict=True):
        assert f.shape == (1, c, math.ceil(97 / r), math.ceil(131 / r))
        assert torch.isfinite(f).all()


def test_dilated_branches_line_up():
    """Every branch of every PSA samples its input on the same grid as a 1x1 conv would (output_stride=8).

    Keeping only the centre tap of a branch's kernel must give exactly a strided 1x1 convolution of
    the input: if a branch's padding did not match its dilated kernel (the 9x9 branch at dilation 4
    spans 33 pixels), its output would be shifted against the other branches and the shortcut.
    """
    model = timm.create_model('epsanet50', output_stride=8).eval()
    dilations = set()
    for psa in model.modules():
        if not isinstance(psa, PyramidSqueezeAttention):
            continue
        x = torch.randn(1, psa['conv_1'].in_channels, 11, 13)
        for i in range(1, psa.num_branches + 1):
            conv = psa[f'conv_{i}']
            dilations.add(conv.dilation[0])
            c = conv.kernel_size[0] // 2
            centre_only = torch.zeros_like(conv.weight)
            centre_only[..., c, c] = conv.weight[..., c, c]
            with torch.no_grad():
                out = F.conv2d(x, centre_only, None, conv.stride, conv.padding, conv.dilation, conv.groups)
                expected = F.conv2d(x, centre_only[..., c : c + 1, c : c + 1], None, conv.stride, 0, 1, conv.groups)
            assert out.shape == expected.shape
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert dilations == {1, 2, 4}


class _WrapAroundPadding(TorchFunctionMode):
    """Runs every padded conv2d with wrap-around instead of zero padding, whoever calls it and how.

    Intercepting the functional call (rather than setting ``padding_mode`` on the modules) also covers
    code paths that call ``F.conv2d`` with a module's weight directly.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.conv2d, F.conv2d):
            names = ('input', 'weight', 'bias', 'stride', 'padding', 'dilation', 'groups')
            call = dict(zip(names, args, strict=False), **kwargs)  # args may stop early
            ph, pw = _pair(call.get('padding', 0))
            if ph or pw:
                call['input'] = F.pad(call['input'], (pw, pw, ph, ph), mode='circular')
                call['padding'] = 0
            return func(**call)
        return func(*args, **kwargs)


def test_shifted_input_gives_shifted_output():
    """At output_stride=8, rolling the image by 8 px rolls the last stage by exactly one pixel.

    The real model pads with zeros and its squeeze-excite gates pool the whole image, so every
    output pixel sees the borders (the receptive field at output_stride 8 is ~1900 px): exact
    equivariance can only be checked with wrap-around padding. It holds only if every stride and
    dilation puts its samples on the grid that output_stride=8 implies. As a control, a 4 px roll
    must *not* give the rolled output.
    """
    model = create(output_stride=8)
    pool = model.maxpool
    model.maxpool = nn.Sequential(nn.CircularPad2d(pool.padding), nn.MaxPool2d(pool.kernel_size, pool.stride))
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))  # layer4 16x16 >= its padding
    with torch.no_grad(), _WrapAroundPadding():
        out = model.forward_features(x)
        shifted = model.forward_features(x.roll((8, -16), (-2, -1)))
        half = model.forward_features(x.roll(4, -1))
    assert out.shape == (1, 2048, 16, 16)
    torch.testing.assert_close(shifted, out.roll((1, -2), (-2, -1)), atol=1e-4, rtol=1e-4)
    assert (half - out.roll(1, -1)).abs().max() > 1e-2


# --- forward_intermediates / prune_intermediate_layers ---------------------------------------------


@pytest.mark.parametrize('indices,take', [(None, [0, 1, 2, 3, 4]), (2, [3, 4]), ([0, 3], [0, 3]), ((1, 2), [1, 2])])
def test_forward_intermediates(model50, image, reference, indices, take):
    with torch.no_grad():
        final, inter = model50.forward_intermediates(image, indices=indices, output_fmt='NCHW')
        only = model50.forward_intermediates(image, indices=indices, intermediates_only=True, norm=True)
        early_final, early = model50.forward_intermediates(image, indices=indices, stop_early=True)
        features = model50.forward_features(image)
    assert_same(inter, [reference[i] for i in take])
    assert_same(only, inter, atol=0)  # ResNet has no final norm: norm=True changes nothing
    assert_same(early, inter, atol=0)
    torch.testing.assert_close(final, features)
    torch.testing.assert_close(final, reference[4])
    # stop_early skips the stages after the last requested one (the stem output is index 0)
    if max(take) > 0:
        torch.testing.assert_close(early_final, reference[max(take)])


def test_forward_intermediates_rejects_nhwc(model50, image):
    with pytest.raises(AssertionError, match='NCHW'):
        model50.forward_intermediates(image, output_fmt='NHWC')


@pytest.mark.parametrize('indices', [[1, 2], 1])
def test_prune_intermediate_layers(image, reference, indices):
    model = create()
    kept = model.prune_intermediate_layers(indices)
    take = [1, 2] if indices == [1, 2] else [4]
    assert kept == take
    # Stages after the last kept one are gone, and the head with them.
    remaining = sum(1 for n in ('layer1', 'layer2', 'layer3', 'layer4') if len(getattr(model, n)))
    assert remaining == max(take)
    assert isinstance(model.fc, nn.Identity)
    with torch.no_grad():
        assert_same(
            model.forward_intermediates(image, indices=indices, intermediates_only=True), [reference[i] for i in take]
        )


# --- head, classifier, grad checkpointing ----------------------------------------------------------


def test_forward_head_and_reset_classifier(image, reference):
    model = create()
    with torch.no_grad():
        features = model.forward_features(image)
        pooled = model.forward_head(features, pre_logits=True)
        logits = model(image)
    assert pooled.shape == (2, 2048)
    torch.testing.assert_close(pooled, reference[4].mean((2, 3)))
    torch.testing.assert_close(logits, model.fc(pooled))
    assert logits.shape == (2, 1000)

    model.reset_classifier(10)
    assert model.get_classifier().out_features == 10
    with torch.no_grad():
        assert model(image).shape == (2, 10)
    model.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(model(image), pooled)
    model.reset_classifier(0, global_pool='')
    with torch.no_grad():
        torch.testing.assert_close(model(image), reference[4])


def test_grad_checkpointing_same_outputs_and_gradients(image):
    model = create().train()
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    assert checkpointed.grad_checkpointing and not model.grad_checkpointing

    results = []
    for m in (model, checkpointed):
        x = image.clone().requires_grad_(True)
        out = m(x)
        out.square().mean().backward()
        results.append((out.detach(), x.grad, {n: p.grad for n, p in m.named_parameters()}))
    (out_a, xg_a, g_a), (out_b, xg_b, g_b) = results
    torch.testing.assert_close(out_b, out_a)  # float32 defaults: identical up to rounding
    torch.testing.assert_close(xg_b, xg_a, atol=1e-6, rtol=1e-5)
    assert g_a.keys() == g_b.keys() and all(g is not None for g in g_a.values())
    for n in g_a:
        torch.testing.assert_close(g_b[n], g_a[n], atol=1e-6, rtol=1e-5, msg=n)


def test_epsanet101_features_quick():
    backbone = create('epsanet101', features_only=True, out_indices=(2, 3, 4), output_stride=16)
    model = create('epsanet101', output_stride=16)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = backbone(x)
    assert_same(feats, stage_outputs(model, x)[2:])
    assert [f.shape[-1] for f in feats] == [8, 4, 4]
