"""Publishing and loading pretrained weights without the Hub: hub_upload.py's folder, local-dir:, file=.

The deterministic "authors' weights" of tests/official_weights.py stand in for trained weights, so
every load is checked bit for bit against the source and against the golden logits of the authors' code.
Cost: 25 tests, 40 s CPU (79 s wall on a busy 2-core box): four exports, one subprocess, ~20 model builds.
"""

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

from timm_epsanet import publish

from official_weights import GOLDEN, golden_input, official_keys

REPO_ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4


# Nothing here may use the Hub (tests/conftest.py: offline mode, an empty cache).
pytestmark = pytest.mark.usefixtures('no_hub')


@pytest.fixture(scope='module')
def exported(tmp_path_factory, authors_file):
    out = tmp_path_factory.mktemp('export') / 'epsanet50.in1k'
    argv = ['--model', 'epsanet50', '--checkpoint', str(authors_file), '--output-dir', str(out)]
    assert publish.main(argv + ['--top1', '77.49', '--top5', '93.54']) == 0
    return out


def _logits(model):
    with torch.no_grad():
        return model.eval()(golden_input())


def _assert_same_weights(model, ref_model):
    ours, ref = model.state_dict(), ref_model.state_dict()
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k


# --- the folder hub_upload.py writes ---


def test_folder_holds_safetensors_config_and_card_only(exported, weights):
    assert sorted(p.name for p in exported.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    tensors = load_file(exported / 'model.safetensors')
    expected = weights
    assert tensors.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(tensors[k], v), k


def test_config_json_is_timm_hub_format(exported):
    config = json.loads((exported / 'config.json').read_text())
    assert config['architecture'] == 'epsanet50'
    assert config['num_classes'] == 1000
    assert config['num_features'] == 2048
    cfg = config['pretrained_cfg']
    assert cfg['tag'] == 'in1k'
    assert cfg['input_size'] == [3, 224, 224]
    assert cfg['first_conv'] == 'conv1' and cfg['classifier'] == 'fc'
    assert 'hf_hub_id' not in cfg and 'file' not in cfg  # a published folder says nothing about its own location


def test_model_card(exported, authors_file):
    text = (exported / 'README.md').read_text()
    assert text.startswith('---\n')
    meta = yaml.safe_load(text.split('---\n')[1])
    assert meta['library_name'] == 'timm'
    assert {'image-classification', 'timm'} <= set(meta['tags'])
    assert meta['license'] == 'apache-2.0'
    assert meta['datasets'] == ['imagenet-1k']

    def stat(label):
        line = next(line for line in text.splitlines() if line.strip().startswith(f'- {label}:'))
        return line.split(':', 1)[1].strip()

    # The paper's EPSANet-50 (Small): 22.56M params, 3.62 GFLOPs with BatchNorm (3.60 G without).
    assert stat('Params (M)') == '22.56'
    assert abs(float(stat('GMACs')) - 3.62) < 0.03
    assert stat('Image size') == '224 x 224'
    assert stat('Top-1 (%)') == '77.49' and stat('Top-5 (%)') == '93.54'
    # Activations: outputs of every conv / linear layer at 224, counted here on a real forward.
    model = timm.create_model('epsanet50').eval()
    counted = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: counted.append(o.numel()))
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    assert stat('Activations (M)') == f'{sum(counted) / 1e6:.2f}'

    assert "timm.create_model('hf-hub:timm-epsanet/epsanet50.in1k', pretrained=True)" in text
    assert 'features_only=True' in text and 'resolve_data_config' in text and 'import timm_epsanet' in text
    assert publish._sha256(authors_file) in text and "authors' main.py" in text  # provenance
    assert '```bibtex\n@article{zhang2021epsanet' in text and 'arXiv:2105.14447' in text


def test_card_without_results_has_no_results():
    model = timm.create_model('epsanet50', device='meta')
    checkpoint = publish.Checkpoint(Path('w.pth'), {}, 'a plain state dict', sha256='0' * 64)
    text = publish.make_model_card(model, tag='in1k', repo_id='org/name', checkpoint=checkpoint)
    assert 'Top-1' not in text and 'Results' not in text
    assert "create_model('hf-hub:org/name', pretrained=True)" in text


# --- loading paths that never touch the Hub ---


def test_local_dir_matches_source_and_golden(exported, reference):
    model = timm.create_model(f'local-dir:{exported}', pretrained=True)
    ref_model, ref_logits = reference
    _assert_same_weights(model, ref_model)
    logits = _logits(model)
    assert torch.equal(logits, ref_logits)
    torch.testing.assert_close(logits, load_file(GOLDEN['epsanet50'])['logits'], rtol=0, atol=TOL)


@pytest.mark.parametrize('source', ['authors', 'safetensors'])
def test_overlay_file(source, authors_file, exported, reference):
    file = authors_file if source == 'authors' else exported / 'model.safetensors'
    model = timm.create_model('epsanet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
    _assert_same_weights(model, reference[0])
    assert torch.equal(_logits(model), reference[1])


def test_num_classes_on_pretrained_reinitialises_classifier(exported, reference):
    ref_model = reference[0]
    model = timm.create_model(f'local-dir:{exported}', pretrained=True, num_classes=10).eval()
    assert model.fc.weight.shape == (10, 2048)
    assert not torch.equal(model.fc.weight, ref_model.fc.weight[:10])  # fresh head, not a slice of the old one
    ours, ref = model.state_dict(), ref_model.state_dict()
    for k in ref:
        if not k.startswith('fc.'):
            assert torch.equal(ours[k], ref[k]), k
    x = golden_input()[:1]
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), ref_model.forward_features(x))


@pytest.mark.parametrize('in_chans', [1, 4])
def test_in_chans_on_pretrained_adapts_stem(in_chans, authors_file, reference):
    ref_weight = reference[0].conv1.weight.detach()
    model = timm.create_model(
        'epsanet50', pretrained=True, in_chans=in_chans, pretrained_cfg_overlay=dict(file=str(authors_file))
    )
    weight = model.conv1.weight.detach()
    assert weight.shape == (64, in_chans, 7, 7)
    if in_chans == 1:  # grayscale: the colour filters are summed
        expected = ref_weight.sum(dim=1, keepdim=True)
    else:  # extra channels repeat the RGB filters, all scaled by 3 / in_chans
        expected = torch.cat([ref_weight, ref_weight[:, :1]], dim=1) * (3 / in_chans)
    torch.testing.assert_close(weight, expected)
    assert torch.equal(model.layer4[2].conv3.weight, reference[0].layer4[2].conv3.weight)


# --- checkpoint formats hub_upload.py accepts ---


def _export(tmp_path, checkpoint_path, *extra):
    out = tmp_path / 'out'
    argv = ['--model', 'epsanet50', '--checkpoint', str(checkpoint_path), '--output-dir', str(out), *extra]
    assert publish.main(argv) == 0
    return load_file(out / 'model.safetensors')


def test_timm_train_checkpoint_with_and_without_ema(tmp_path, weights):
    ema = {k: v * 0.5 if v.is_floating_point() else v for k, v in weights.items()}
    path = tmp_path / 'checkpoint-9.pth.tar'
    torch.save(
        {
            'epoch': 9,
            'arch': 'epsanet50',
            'state_dict': weights,
            'state_dict_ema': ema,
            'optimizer': {'state': {}, 'param_groups': []},
            'version': 2,
            'args': argparse.Namespace(model='epsanet50', lr=0.1),  # what train.py stores; needs an allowlist
            'metric': 0.25,
        },
        path,
    )
    # Without --use-ema: the trained weights, as for the authors' checkpoints.
    checkpoint = publish.load_checkpoint(str(path))
    assert checkpoint.kind == 'a timm train.py checkpoint (epoch 9)'
    converted, _ = publish.convert_checkpoint(checkpoint, 'epsanet50')
    assert all(torch.equal(converted[k], weights[k]) for k in weights)
    # With --use-ema, end to end.
    out = _export(tmp_path, path, '--use-ema')
    assert out.keys() == ema.keys()
    assert all(torch.equal(out[k], ema[k]) for k in ema)
    assert 'EMA weights (state_dict_ema) of a timm train.py checkpoint' in (tmp_path / 'out' / 'README.md').read_text()


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_plain_state_dict_and_safetensors(suffix, tmp_path, weights):
    path = tmp_path / f'weights{suffix}'
    if suffix == '.safetensors':
        save_file(weights, path)
    else:
        torch.save({f'_orig_mod.{k}': v for k, v in weights.items()}, path)  # torch.compile'd model
    checkpoint = publish.load_checkpoint(str(path))
    converted, model_kwargs = publish.convert_checkpoint(checkpoint, 'epsanet50')
    assert model_kwargs == {'num_classes': 1000, 'in_chans': 3}
    assert converted.keys() == weights.keys()
    assert all(torch.equal(converted[k], weights[k]) for k in weights)


def test_fine_tuned_checkpoint_keeps_its_head(tmp_path, weights, capsys):
    """A checkpoint with another classifier size is published as it is (num_classes from the checkpoint)."""
    tuned = dict(weights, **{'fc.weight': weights['fc.weight'][:10].clone(), 'fc.bias': weights['fc.bias'][:10]})
    path = tmp_path / 'tuned.pth'
    torch.save(tuned, path)
    out = _export(tmp_path, path, '--dataset', 'cifar-10')
    assert out['fc.weight'].shape == (10, 2048)
    config = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert config['num_classes'] == 10
    model = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True)
    assert torch.equal(model.fc.weight, tuned['fc.weight'])


# --- errors: non-zero exit, one line that says what is wrong ---


class NotAllowed:
    """An arbitrary class: unpickling it would run code of the checkpoint's choosing."""


def _zero_authors_checkpoint(arch):
    """An authors'-format checkpoint of ``arch`` (values do not matter, only names and shapes)."""
    state_dict = {f'module.{k}': torch.zeros(shape) for k, shape in official_keys(arch).items()}
    return {'epoch': 1, 'arch': arch, 'state_dict': state_dict, 'best_prec1': 0.0, 'optimizer': {}}


def _write(path, data):
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        torch.save(data, path)
    return path


# case: (make the flags that replace or add to a good command line, words the error must contain)
BAD_INPUTS = {
    'missing': (lambda d: {'--checkpoint': d / 'nope.pth'}, ['does not exist', 'nope.pth']),
    'unknown-model': (lambda d: {'--model': 'resnet50'}, ["unknown model 'resnet50'", 'epsanet50']),
    'garbage': (
        lambda d: {'--checkpoint': _write(d / 'garbage.pth', b'this is not a checkpoint')},
        ['cannot read', 'weights_only=True'],
    ),
    'unsafe-pickle': (
        lambda d: {'--checkpoint': _write(d / 'unsafe.pth', {'state_dict': {}, 'extra': NotAllowed()})},
        ['cannot read', 'test_weights.NotAllowed'],
    ),
    'other-arch': (
        # epsanet101's stages 1, 2 and 4 have the same shapes: only the extra layer3 blocks give it away
        lambda d: {'--checkpoint': _write(d / 'e101.pth', _zero_authors_checkpoint('epsanet101'))},
        ['does not fit epsanet50', 'unexpected keys: layer3.10.', '--model epsanet101'],
    ),
    'no-ema': (lambda d: {'--use-ema': None}, ['no EMA weights', 'drop --use-ema']),
    'bad-repo-id': (lambda d: {'--repo-id': 'my org/epsanet'}, ["--repo-id 'my org/epsanet'", 'use ORG/NAME']),
    'dirty-output': (
        lambda d: {'--output-dir': _write(d / 'pytorch_model.bin', b'').parent},
        ['pytorch_model.bin', 'empty or new folder'],
    ),
}


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_errors_are_one_line(case, tmp_path, authors_file, capsys):
    make_flags, expected = BAD_INPUTS[case]
    out = tmp_path / 'out'
    options = {'--model': 'epsanet50', '--checkpoint': authors_file, '--output-dir': out, **make_flags(tmp_path)}
    argv = [str(item) for flag, value in options.items() for item in ((flag,) if value is None else (flag, value))]
    assert publish.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: ') and 'Traceback' not in err
    for words in expected:
        assert words in err
    assert not out.exists()  # nothing half-written


def test_verify_refuses_a_folder_that_differs(exported, reference):
    source = copy.deepcopy(reference[0])
    with torch.no_grad():
        source.layer3[0].conv2.se.fc1.bias[0] += 1e-6  # the folder no longer holds what "was exported"
    with pytest.raises(publish.PublishError, match='verification failed.*layer3.0.conv2.se.fc1.bias'):
        publish.verify_folder(exported, source)


# --- the script itself ---


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        publish.main(['--help'], prog='hub_upload.py')
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('usage: hub_upload.py')
    for flag in ('--model', '--checkpoint', '--output-dir', '--repo-id', '--tag', '--use-ema', '--private'):
        assert flag in out
    for flag in ('--revision', '--commit-message', '--top1', '--top5', '--dataset'):
        assert flag in out


def test_script_runs_from_the_repo_root(tmp_path):
    """``python hub_upload.py`` works from a checkout, with the documented exit status and one-line errors."""
    script = [sys.executable, str(REPO_ROOT / 'hub_upload.py')]
    proc = subprocess.run(
        script + ['--model', 'epsanet50', '--checkpoint', str(tmp_path / 'missing.pth.tar')],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert proc.stderr.count('\n') == 1 and 'does not exist' in proc.stderr and 'Traceback' not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written
