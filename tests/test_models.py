"""Registration, sizes against the paper, pretrained configs and checkpoint conversion."""

import subprocess
import sys

import pytest
import timm
import torch

from timm_epsanet import HUB_ORGANIZATION, EPSABottleneck, PyramidSqueezeAttention, checkpoint_filter_fn
from timm_epsanet.zoo import count_macs

from official_weights import authors_checkpoint, deterministic_state_dict

# Parameter counts and MACs from the paper / authors' README (FLOPs there are thop MACs incl. BatchNorm).
# Small: the authors' epsanet50()/epsanet101() (exact counts from their code). Large: the paper's 27.90M / 49.59M.
PAPER = {
    'epsanet50': (22_561_715, 3.62),
    'epsanet101': (38_900_279, 6.82),
    'epsanet50_large': (27_899_518, 4.72),
    'epsanet101_large': (49_592_198, 8.97),
}
MODELS = sorted(PAPER)


def test_all_models_registered():
    assert sorted(timm.list_models('epsanet*')) == MODELS
    assert sorted(timm.list_pretrained('epsanet*')) == sorted(f'{m}.in1k' for m in MODELS)
    assert 'epsanet' in timm.list_modules()


@pytest.mark.parametrize('name', MODELS)
def test_params_and_macs_match_paper(name):
    params, gmacs = PAPER[name]
    model = timm.create_model(name, device='meta').eval()
    assert sum(p.numel() for p in model.parameters()) == params
    measured = count_macs(model) / 1e9
    assert abs(measured - gmacs) / gmacs < 0.01, measured


@pytest.mark.parametrize('name', MODELS)
def test_pretrained_cfg(name):
    cfg = timm.models.get_pretrained_cfg(f'{name}.in1k')
    assert cfg.hf_hub_id == f'{HUB_ORGANIZATION}/{name}.in1k'
    assert cfg.input_size == (3, 224, 224) and cfg.pool_size == (7, 7)
    assert cfg.crop_pct == 0.875 and cfg.interpolation == 'bilinear'
    assert cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN and cfg.std == timm.data.IMAGENET_DEFAULT_STD
    assert (cfg.first_conv, cfg.classifier) == ('conv1', 'fc')
    assert cfg.paper_ids == 'arXiv:2105.14447' and 'murufeng/EPSANet' in cfg.origin_url
    assert cfg.license and cfg.notes
    if name.endswith('_large'):
        assert 'reconstructed' in cfg.notes
        assert 'reconstructed' in timm.models.model_entrypoint(name).__doc__


def test_create_model_forward_and_classes():
    model = timm.create_model('epsanet50', num_classes=10).eval()
    assert isinstance(model, timm.models.ResNet)
    blocks = [m for m in model.modules() if isinstance(m, EPSABottleneck)]
    assert len(blocks) == 16
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_large_widths():
    model = timm.create_model('epsanet50_large', device='meta')
    widths = [model.get_submodule(f'layer{i}.0.conv2').branch_chs * 4 for i in range(1, 5)]
    assert widths == [128, 256, 512, 1024]
    psa = model.layer1[0].conv2
    assert [psa[f'conv_{i}'].kernel_size[0] for i in range(1, 5)] == [3, 5, 5, 7]
    assert [psa[f'conv_{i}'].groups for i in range(1, 5)] == [32] * 4
    assert model.layer4[-1].conv3.out_channels == 2048


def test_unknown_model_is_clear():
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('epsanet51')


def test_dilation_pads_every_branch():
    model = timm.create_model('epsanet50', output_stride=8, device='meta')
    psa = model.layer4[1].conv2
    for i, k in enumerate((3, 5, 7, 9), start=1):
        conv = psa[f'conv_{i}']
        assert conv.dilation == (4, 4) and conv.padding == (4 * (k - 1) // 2,) * 2


def test_block_args_honoured():
    model = timm.create_model('epsanet50', drop_path_rate=0.1, act_layer='silu', device='meta', dtype=torch.bfloat16)
    assert model.layer4[-1].drop_path is not None
    assert isinstance(model.layer1[0].act1, torch.nn.SiLU)
    assert all(p.device.type == 'meta' and p.dtype == torch.bfloat16 for p in model.parameters())


def test_psa_validates_configuration():
    with pytest.raises(ValueError, match='divisible by the number of branches'):
        PyramidSqueezeAttention(64, 66)
    with pytest.raises(ValueError, match='groups=8 must divide in_chs=48 and the branch width 12'):
        PyramidSqueezeAttention(48, 48)
    with pytest.raises(ValueError, match='kernel sizes must be odd'):
        PyramidSqueezeAttention(64, 64, kernel_sizes=(3, 4, 7, 9))
    with pytest.raises(ValueError, match='2 kernel sizes but 4 groups'):
        PyramidSqueezeAttention(64, 64, kernel_sizes=(3, 5))


def test_psa_is_a_pluggable_layer():
    psa = PyramidSqueezeAttention(32, 48, kernel_sizes=(3, 5, 7), groups=(1, 2, 4), stride=2, rd_ratio=1 / 4)
    out = psa(torch.randn(2, 32, 15, 15))
    assert out.shape == (2, 48, 8, 8)
    assert sorted(psa.state_dict()) == sorted(
        [f'conv_{i}.weight' for i in (1, 2, 3)] + ['se.fc1.weight', 'se.fc1.bias', 'se.fc2.weight', 'se.fc2.bias']
    )


# --- checkpoint conversion -------------------------------------------------------------------------


@pytest.fixture(scope='module')
def model50():
    return timm.create_model('epsanet50')


def test_filter_accepts_authors_checkpoint(model50):
    state_dict = checkpoint_filter_fn(authors_checkpoint('epsanet50'), model50)
    reference = deterministic_state_dict('epsanet50')
    assert state_dict.keys() == reference.keys()
    assert all(torch.equal(state_dict[k], reference[k]) for k in reference)


def test_filter_accepts_timm_train_checkpoint(model50):
    reference = deterministic_state_dict('epsanet50')
    checkpoint = {'epoch': 3, 'arch': 'epsanet50', 'state_dict': reference, 'optimizer': {}, 'version': 2}
    state_dict = checkpoint_filter_fn(checkpoint, model50)
    assert all(torch.equal(state_dict[k], reference[k]) for k in reference)


def test_authors_checkpoint_file_loads_on_cpu(tmp_path):
    """A main.py file goes through timm's own file loader (weights_only) and our filter."""
    path = tmp_path / 'model_best.pth.tar'
    torch.save(authors_checkpoint('epsanet50'), path)
    model = timm.create_model('epsanet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    reference = deterministic_state_dict('epsanet50')
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference)


def test_filter_rejects_other_architecture(model50):
    resnet_sd = timm.create_model('resnet50').state_dict()
    with pytest.raises(ValueError, match=r'does not fit epsanet50.*missing keys: .*conv2\.conv_1\.weight'):
        checkpoint_filter_fn(resnet_sd, model50)


def test_filter_rejects_other_variant(model50):
    large_sd = timm.create_model('epsanet50_large').state_dict()
    with pytest.raises(ValueError, match=r'shape mismatches .*layer1\.0\.bn1\.weight \(128,\) vs \(64,\)'):
        checkpoint_filter_fn(large_sd, model50)


def test_filter_rejects_missing_and_extra_keys(model50):
    state_dict = deterministic_state_dict('epsanet50')
    del state_dict['layer2.1.conv2.se.fc1.bias']
    state_dict['layer2.1.conv2.extra.weight'] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        checkpoint_filter_fn(state_dict, model50)
    message = str(info.value)
    assert 'missing keys: layer2.1.conv2.se.fc1.bias' in message
    assert 'unexpected keys: layer2.1.conv2.extra.weight' in message


def test_filter_leaves_head_to_timm():
    """num_classes / in_chans adaptation happens in timm after the filter, so those shapes may differ."""
    path_model = timm.create_model('epsanet50', num_classes=5, in_chans=1)
    state_dict = checkpoint_filter_fn(deterministic_state_dict('epsanet50'), path_model)
    assert state_dict['fc.weight'].shape == (1000, 2048)


def test_zoo_cli_prints_table():
    out = subprocess.run(
        [sys.executable, '-m', 'timm_epsanet'], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    rows = {line.split('|')[1].strip(): line for line in out.splitlines() if line.startswith('| epsanet')}
    assert sorted(rows) == sorted(MODELS)
    assert '22.56' in rows['epsanet50'] and '3.60' in rows['epsanet50'] and '77.49' in rows['epsanet50']
    assert '64/256/512/1024/2048' in rows['epsanet101']
    assert 'not published' in rows['epsanet101_large']


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
        torch.testing.assert_close(fast(x), ref(x), rtol=0, atol=1e-4)
    for model in (fast.double(), ref.double()):
        model(x.double()).logsumexp(dim=1).sum().backward()
    for (name, p_f), p_r in zip(fast.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p_f.grad, p_r.grad, rtol=0, atol=1e-10, msg=name)
