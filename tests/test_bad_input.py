"""Wrong inputs fail with an error that says what was expected; odd sizes just work. About 10 s on CPU."""

import math

import pytest
import timm
import torch

import timm_epsanet  # noqa: F401  (registers the models)

# Each stride-2 stage needs 2 pixels to downsample, so the smallest image side is output_stride / 2 + 1.
MIN_SIDE = {32: 17, 16: 9, 8: 5}
REDUCTIONS = {32: [2, 4, 8, 16, 32], 16: [2, 4, 8, 16, 16], 8: [2, 4, 8, 8, 8]}


@pytest.fixture(scope='module', params=[32, 16, 8])
def model(request):
    torch.manual_seed(0)
    return timm.create_model('epsanet50', output_stride=request.param).eval()


@pytest.mark.parametrize(
    'shape,message',
    [
        # conv2d accepts an unbatched 3-D image; the first BatchNorm then asks for 4-D.
        ((3, 64, 64), 'expected 4D input'),
        ((64, 64), r'4D \(batched\) input to conv2d, but got input of size: \[64, 64\]'),
        ((1, 1, 3, 64, 64), r'4D \(batched\) input to conv2d, but got input of size: \[1, 1, 3, 64, 64\]'),
    ],
)
def test_not_4d(shape, message):
    model = timm.create_model('epsanet50', device='cpu').eval()
    with pytest.raises((ValueError, RuntimeError), match=message), torch.no_grad():
        model(torch.randn(*shape))


@pytest.mark.parametrize('in_chans', [1, 4])
def test_wrong_channels(in_chans):
    model = timm.create_model('epsanet50').eval()
    with pytest.raises(RuntimeError, match=f'to have 3 channels, but got {in_chans} channels instead'), torch.no_grad():
        model(torch.randn(1, in_chans, 64, 64))


def test_in_chans_changes_what_is_expected():
    model = timm.create_model('epsanet50', in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 1000)
    with pytest.raises(RuntimeError, match='to have 1 channels, but got 3 channels'), torch.no_grad():
        model(torch.randn(1, 3, 64, 64))


def test_too_small(model):
    """Smaller than output_stride / 2 + 1 in either side: refused, naming the output stride."""
    output_stride = model.feature_info[-1]['reduction']
    side = MIN_SIDE[output_stride]
    for shape in [(1, 3, 1, 1), (1, 3, side - 1, side - 1), (2, 3, side - 1, 64), (1, 3, 64, side - 1)]:
        with pytest.raises(ValueError, match='too small for the output_stride'), torch.no_grad():
            model(torch.randn(*shape))
    # The smallest accepted image gives a 1x1 map at the last stage.
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, side, side))
    assert out.shape == (1, 2048, 1, 1)


@pytest.mark.parametrize('feature_cls', ['list', 'hook', 'fx', 'getter'])
def test_too_small_features_only(feature_cls):
    """The check survives every extractor, FX tracing included (it is a leaf there, run on real shapes)."""
    backbone = timm.create_model('epsanet50', features_only=True, out_indices=(1, 2, 3, 4), feature_cls=feature_cls)
    backbone.eval()
    with pytest.raises(ValueError, match=r'a 1x1 feature map is too small to downsample by 2'), torch.no_grad():
        backbone(torch.randn(1, 3, 16, 16))


def test_tiny_input_accepted_where_no_stage_downsamples():
    """Only the stem and layer1 remain after pruning: nothing left to refuse an 8x8 image."""
    backbone = timm.create_model('epsanet50', features_only=True, out_indices=(0, 1)).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 8, 8))
    assert [f.shape[-1] for f in feats] == [4, 2]


@pytest.mark.parametrize('height,width', [(97, 131), (33, 45)])
def test_odd_sizes_work(model, height, width):
    output_stride = model.feature_info[-1]['reduction']
    with torch.no_grad():
        _, feats = model.forward_intermediates(torch.randn(1, 3, height, width))
    for f, r in zip(feats, REDUCTIONS[output_stride], strict=True):
        assert f.shape[-2:] == (math.ceil(height / r), math.ceil(width / r))
        assert torch.isfinite(f).all()
