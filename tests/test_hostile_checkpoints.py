"""Checkpoint files that must be refused, through hub_upload.py and through ``pretrained_cfg_overlay=dict(file=)``.

Hostile pickles carry a ``__reduce__`` payload that would create a marker folder when unpickled; it is
hidden in every place a checkpoint can hold an object (the top level, a state dict, timm's ``args``
Namespace, ``state_dict_ema``, deep in the optimizer state), written in every container torch can read
(zip, legacy, a bare pickle) under every suffix the tools accept. Neither path may run it, and each says
so in one line. Broken files (missing, a folder, empty, truncated, not a checkpoint) get one line too.
Cost: ~500 refusals of tiny files, one model build and one subprocess: about 12 s CPU.
"""

import argparse
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from timm_epsanet import publish
from timm_epsanet.checkpoint_io import CheckpointError

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL = {'fc.weight': torch.ones(2, 3), 'fc.bias': torch.zeros(2)}
SUFFIXES = ['.pth', '.pth.tar', '.pt', '.bin', '.ckpt', '.tar', '.safetensors']


class Payload:
    """Unpickling this creates ``marker``: the proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


PLACEMENTS = {
    'top-level': lambda p: p,
    'state-dict-value': lambda p: {'state_dict': {**SMALL, 'fc.bias': p}},
    'args-namespace': lambda p: {'state_dict': SMALL, 'args': argparse.Namespace(lr=0.1, hook=p), 'version': 2},
    'state-dict-ema': lambda p: {'state_dict': SMALL, 'state_dict_ema': {'fc.weight': p}},
    'optimizer-deep': lambda p: {'state_dict': SMALL, 'optimizer': {'param_groups': [{'params': [0], 'x': (1, [p])}]}},
}
FORMATS = ['zip', 'legacy', 'bare-pickle']


def _write(path: Path, content, container: str) -> Path:
    if container == 'bare-pickle':
        path.write_bytes(pickle.dumps(content, protocol=2))
    else:
        torch.save(content, path, _use_new_zipfile_serialization=container == 'zip')
    return path


def test_the_payload_would_run(tmp_path):
    """The marker mechanism works: calling what ``__reduce__`` names creates it (no unpickling involved)."""
    marker = tmp_path / 'ran'
    function, args = Payload(marker).__reduce__()
    function(*args)
    assert marker.is_dir()


@pytest.mark.parametrize('container', FORMATS)
@pytest.mark.parametrize('placement', list(PLACEMENTS))
def test_hostile_pickles_never_run(placement, container, tmp_path, capsys):
    marker = tmp_path / 'PWNED'
    content = PLACEMENTS[placement](Payload(marker))
    for suffix in SUFFIXES:
        path = _write(tmp_path / f'hostile{suffix}', content, container)
        # hub_upload.py
        argv = ['--model', 'epsanet50', '--checkpoint', str(path), '--output-dir', str(tmp_path / 'out')]
        assert publish.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith('error: cannot read') and err.count('\n') == 1, err
        assert 'weights_only=False' not in err and 'safe_globals' not in err
        # timm's file= loading
        with pytest.raises(CheckpointError) as info:
            timm.create_model('epsanet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        message = str(info.value)
        assert message.startswith('cannot read') and '\n' not in message and path.name in message
        assert 'weights_only=False' not in message and 'safe_globals' not in message
        assert not marker.exists(), (placement, container, suffix)
        assert not (tmp_path / 'out').exists()


def test_hostile_pickle_through_the_script(tmp_path):
    marker = tmp_path / 'PWNED'
    path = _write(tmp_path / 'model_best.pth.tar', PLACEMENTS['args-namespace'](Payload(marker)), 'legacy')
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / 'hub_upload.py'), '--model', 'epsanet50', '--checkpoint', str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and proc.stderr.count('\n') == 1 and 'Traceback' not in proc.stderr
    assert 'test_hostile_checkpoints.Payload' in proc.stderr or 'posix.mkdir' in proc.stderr
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model_best.pth.tar']


# --- finding 12: broken files on the file= path, refused by the package's own loading hook ---


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(path: Path) -> Path:
    torch.save(SMALL, path)
    return _bytes(path, path.read_bytes()[: path.stat().st_size // 2])


BROKEN = {
    'missing': (lambda d: d / 'nope.pth', 'does not exist'),
    'directory': (lambda d: d, 'is a directory'),
    'empty': (lambda d: _bytes(d / 'empty.pth', b''), 'is empty'),
    'list': (lambda d: _write(d / 'list.pth', [torch.zeros(1)], 'zip'), 'holds a list'),
    'truncated': (lambda d: _truncated(d / 'half.pth'), 'cannot read'),
    'garbage-safetensors': (lambda d: _bytes(d / 'g.safetensors', b'garbage!garbage!'), 'cannot read'),
    'non-finite': (
        lambda d: _write(d / 'nan.pth', {**SMALL, 'fc.bias': torch.tensor([0.0, float('nan')])}, 'zip'),
        'not finite',
    ),
    'complex': (lambda d: _write(d / 'c.pth', {'fc.bias': torch.zeros(2, dtype=torch.cfloat)}, 'zip'), 'complex'),
}


@pytest.mark.parametrize('case', list(BROKEN))
def test_file_overlay_errors_are_one_line(case, tmp_path):
    make, words = BROKEN[case]
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as info:
        timm.create_model('epsanet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    message = str(info.value)
    assert words in message and str(path) in message and '\n' not in message, message


def test_file_overlay_still_loads_and_keeps_no_copy(authors_file, reference):
    """A good file loads as before, through the features wrapper too, and no cfg keeps a copy of the weights."""
    overlay = dict(file=str(authors_file))
    backbone = timm.create_model('epsanet50', pretrained=True, features_only=True, pretrained_cfg_overlay=overlay)
    assert torch.equal(backbone.layer4[2].conv3.weight, reference[0].layer4[2].conv3.weight)
    assert 'state_dict' not in backbone.pretrained_cfg and backbone.pretrained_cfg['file'] == str(authors_file)
