"""hub_upload.py never harms what is already there, and refuses what it cannot publish faithfully.

One test per finding of issue 12 (the Hub-side ones, concurrent runs included, are in test_hub.py): the
folder is staged, verified and renamed into place, so a failed run leaves the previous export as it was;
files the tool did not write are never touched; checkpoints that would publish something other than what
they hold (non-finite, complex, ambiguous keys) are refused with one line naming the tensors; card inputs
are validated. Cost: 2 exports of epsanet50, 1 run stopped at the card, ~30 cheap refusals: about 20 s CPU.
"""

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from timm_epsanet import publish

FOLDER = ['README.md', 'config.json', 'model.safetensors']


# Nothing here may use the Hub (tests/conftest.py: offline mode, an empty cache).
pytestmark = pytest.mark.usefixtures('no_hub')


@pytest.fixture(scope='module')
def exported(tmp_path_factory, authors_file):
    """A good export; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp('export') / 'epsanet50.in1k'
    assert publish.main(['--model', 'epsanet50', '--checkpoint', str(authors_file), '--output-dir', str(out)]) == 0
    return out


def _run(capsys, checkpoint, out, *extra):
    """``hub_upload.py`` in process: the exit status and stderr (which must be one line on failure)."""
    argv = ['--model', 'epsanet50', '--checkpoint', str(checkpoint), '--output-dir', str(out), *extra]
    status = publish.main([str(a) for a in argv])
    err = capsys.readouterr().err
    if status:
        assert err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err, err
        assert 'unexpected' not in err, err
    return status, err


def _snapshot(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _siblings(folder: Path):
    return sorted(p.name for p in folder.parent.iterdir())


# --- 2. non-finite weights ---


def test_non_finite_weights_are_refused_by_name(tmp_path, weights, capsys):
    bad = dict(weights)
    bad['fc.bias'] = weights['fc.bias'].clone()
    bad['fc.bias'][3] = float('inf')
    bad['layer1.0.conv1.weight'] = weights['layer1.0.conv1.weight'].clone()
    bad['layer1.0.conv1.weight'].view(-1)[7] = float('nan')
    torch.save(bad, tmp_path / 'bad.pth')
    status, err = _run(capsys, tmp_path / 'bad.pth', tmp_path / 'out')
    assert status == 1
    assert 'not finite' in err and 'fc.bias' in err and 'layer1.0.conv1.weight' in err
    assert 'differ' not in err  # not the false "the folder's weights differ" of a NaN != NaN comparison
    assert not (tmp_path / 'out').exists()


# --- 4. files the tool did not write are never touched ---


def test_users_own_readme_is_refused_not_overwritten(tmp_path, authors_file, capsys):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'README.md').write_text('my notes\n')
    status, err = _run(capsys, authors_file, out)
    assert status == 1 and 'README.md' in err and 'not written by hub_upload.py' in err
    assert (out / 'README.md').read_text() == 'my notes\n'


@pytest.mark.parametrize('name', ['README.md', 'config.json'])
def test_symlink_in_output_is_never_written_through(name, tmp_path, exported, authors_file, capsys):
    out = tmp_path / 'out'
    shutil.copytree(exported, out)
    target = tmp_path / 'precious.txt'
    target.write_text('keep me\n')
    (out / name).unlink()
    (out / name).symlink_to(target)
    status, err = _run(capsys, authors_file, out)
    assert status == 1 and name in err and 'symbolic link' in err
    assert target.read_text() == 'keep me\n'
    assert (out / name).is_symlink()


def test_output_dir_that_is_a_symlink_is_refused(tmp_path, authors_file, capsys):
    real = tmp_path / 'real'
    real.mkdir()
    (tmp_path / 'out').symlink_to(real)
    status, err = _run(capsys, authors_file, tmp_path / 'out')
    assert status == 1 and 'symbolic link' in err
    assert list(real.iterdir()) == []


# --- 3, 5. a failed run leaves the previous export whole; write errors said as what they are ---


def test_disk_full_leaves_the_previous_export_whole(tmp_path, exported, authors_file, monkeypatch, capsys):
    """A run that fails while writing (here: the disk fills up during the card) changes nothing (findings 3, 5)."""
    out = tmp_path / 'epsanet50.in1k'
    shutil.copytree(exported, out)
    before = _snapshot(out)
    write_text = Path.write_text

    def full_disk(self, data, *args, **kwargs):
        if self.name == 'README.md':
            write_text(self, data[:10], *args, **kwargs)  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, 'write_text', full_disk)
    status, err = _run(capsys, authors_file, out)
    assert status == 1 and 'disk full' in err
    assert _snapshot(out) == before
    assert _siblings(out) == ['epsanet50.in1k']  # no staging folder or lock left behind


def test_permission_denied_is_said_as_such(tmp_path, authors_file, monkeypatch, capsys):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), kwargs.get('dir') or 'staging')

    monkeypatch.setattr(tempfile, 'mkdtemp', denied)
    out = tmp_path / 'out'
    status, err = _run(capsys, authors_file, out)
    assert status == 1 and 'permission denied' in err
    assert not out.exists() and _siblings(out) == []


def test_file_name_too_long_is_said_as_such(tmp_path, authors_file, capsys):
    out = tmp_path / ('x' * 300)
    status, err = _run(capsys, authors_file, out)
    assert status == 1 and 'file name too long' in err
    assert list(tmp_path.iterdir()) == []


# --- 6. in_chans != 3; 9. the checkpoint's file name goes into the card escaped ---

ODD_NAME = 'tuned\n# Pwned `x` <b>y.pth'


@pytest.fixture(scope='module')
def one_channel_export(tmp_path_factory, weights, exported):
    """A fine-tuned 1-channel, 10-class checkpoint with a hostile file name, exported over a previous export."""
    root = tmp_path_factory.mktemp('one-channel')
    tuned = dict(weights)
    tuned['conv1.weight'] = weights['conv1.weight'].sum(dim=1, keepdim=True)
    tuned['fc.weight'], tuned['fc.bias'] = weights['fc.weight'][:10].clone(), weights['fc.bias'][:10].clone()
    checkpoint = root / ODD_NAME
    torch.save(tuned, checkpoint)
    out = root / 'out'
    shutil.copytree(exported, out)
    argv = ['--model', 'epsanet50', '--checkpoint', str(checkpoint), '--output-dir', str(out)]
    assert publish.main(argv + ['--dataset', 'mnist', '--top1', '99.1']) == 0
    return out, tuned


def test_one_channel_checkpoint_is_published(one_channel_export):
    out, tuned = one_channel_export
    assert sorted(p.name for p in out.iterdir()) == FOLDER  # the previous export was replaced as a whole
    config = json.loads((out / 'config.json').read_text())
    assert config['pretrained_cfg']['input_size'][0] == 1 and config['num_classes'] == 10
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert torch.equal(model.conv1.weight, tuned['conv1.weight'])
    stored = load_file(out / 'model.safetensors')
    assert all(torch.equal(stored[k], tuned[k]) for k in tuned)


def test_card_escapes_the_checkpoint_file_name(one_channel_export):
    text = (one_channel_export[0] / 'README.md').read_text()
    _, header, body = text.split('---\n', 2)
    meta = yaml.safe_load(header)
    assert meta['datasets'] == ['mnist'] and meta['license'] == 'apache-2.0'
    assert not any(line.startswith('# Pwned') for line in body.splitlines())
    # One line, in a code span (Markdown and HTML inside are shown, not rendered), the newline spelled out.
    assert '`` tuned\\n# Pwned `x` <b>y.pth ``' in body


# --- 7. EMA-only checkpoints; 8. ambiguous checkpoints ---

SMALL = {'fc.weight': torch.ones(2, 3), 'fc.bias': torch.zeros(2)}

REFUSED = {
    'ema-only': ({'state_dict_ema': SMALL, 'version': 2, 'epoch': 3}, ['only EMA weights', '--use-ema']),
    'duplicate-after-prefix': (
        {'fc.weight': torch.ones(2, 3), 'module.fc.weight': torch.zeros(2, 3)},
        ["'fc.weight'", "'module.fc.weight'", 'same name'],
    ),
    'duplicate-in-state-dict': (
        {'state_dict': {'_orig_mod.fc.bias': torch.ones(2), 'module.fc.bias': torch.ones(2)}},
        ["'_orig_mod.fc.bias'", "'module.fc.bias'"],
    ),
    'complex': ({**SMALL, 'fc.bias': torch.zeros(2, dtype=torch.complex64)}, ['complex', 'fc.bias']),
    'integer-key': ({**SMALL, 0: torch.zeros(1)}, ['not a string', '0']),
    'not-a-dict': ([torch.zeros(1)], ['holds a list', 'not a checkpoint']),
    'no-tensors': ({'epoch': 3}, ['no tensors']),
}


@pytest.mark.parametrize('case', list(REFUSED))
def test_ambiguous_or_lossy_checkpoints_are_refused(case, tmp_path, capsys):
    content, words = REFUSED[case]
    torch.save(content, tmp_path / 'ckpt.pth')
    status, err = _run(capsys, tmp_path / 'ckpt.pth', tmp_path / 'out')
    assert status == 1
    for w in words:
        assert w in err, err
    assert not (tmp_path / 'out').exists()


# --- 9. model-card inputs ---

BAD_CARD_INPUTS = {
    'dataset-newline': (['--dataset', 'x\nlicense: mit'], '--dataset'),
    'dataset-path': (['--dataset', 'a/../b'], '--dataset'),
    'top1-nan': (['--top1', 'nan'], '--top1'),
    'top1-inf': (['--top1', 'inf'], '--top1'),
    'top5-above-100': (['--top5', '250'], '--top5'),
    'top1-negative': (['--top1', '-1'], '--top1'),
    'top5-below-top1': (['--top1', '80', '--top5', '70'], '--top5'),
    'tag-path': (['--tag', 'x/../../../y'], '--tag'),
    'tag-newline': (['--tag', 'in1k\nx'], '--tag'),
}


@pytest.mark.parametrize('case', list(BAD_CARD_INPUTS))
def test_card_inputs_are_validated(case, tmp_path, authors_file, monkeypatch, capsys):
    flags, named = BAD_CARD_INPUTS[case]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / 'a' / 'b' / 'c' / 'out'
    status, err = _run(capsys, authors_file, out, *flags)
    assert status == 1 and named in err
    assert list(tmp_path.iterdir()) == []  # nothing written, inside or outside the output folder


# --- 10. no advice toward an unsafe load ---


class Opaque:
    """An arbitrary class: the safe unpickler refuses it."""


@pytest.mark.parametrize('legacy', [False, True])
def test_unsafe_pickle_message_never_suggests_an_unsafe_load(legacy, tmp_path, capsys):
    path = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': SMALL, 'extra': Opaque()}, path, _use_new_zipfile_serialization=not legacy)
    status, err = _run(capsys, path, tmp_path / 'out')
    assert status == 1 and 'test_publish.Opaque' in err
    assert 'weights_only=False' not in err and 'weights_only` set to `False' not in err
    assert 'add_safe_globals' not in err and 'safe_globals(' not in err


# --- 11. same permissions for every file ---


def test_every_file_gets_the_same_permissions(exported):
    modes = {name: stat.S_IMODE((exported / name).stat().st_mode) for name in FOLDER}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes
    assert stat.S_IMODE(exported.stat().st_mode) == 0o777 & ~umask


def test_previous_export_is_recognised_by_content(exported, tmp_path, authors_file, capsys):
    """config.json says who wrote the folder; that, not the file names, is what lets a rerun replace it."""
    config = json.loads((exported / 'config.json').read_text())
    assert config['timm_epsanet_export']['tool'] == 'hub_upload.py'
    # The same three names, but config.json is someone else's: refused, untouched.
    out = tmp_path / 'out'
    shutil.copytree(exported, out)
    del config['timm_epsanet_export']
    (out / 'config.json').write_text(json.dumps(config))
    before = _snapshot(out)
    status, err = _run(capsys, authors_file, out)
    assert status == 1 and 'not written by hub_upload.py' in err
    assert _snapshot(out) == before
