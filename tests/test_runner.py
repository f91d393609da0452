"""``python -m timm_epsanet.run``: timm scripts see the EPSANet models, alone and under torchrun.

timm's scripts are not on PyPI, so a stand-in script (tests/standin_timm_script.py) plays their part:
it imports only timm, creates ``--model`` by name and runs one training step. About 25 s on 2 cores
(three interpreter start-ups that import torch and timm, one of them torchrun with 2 processes).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from timm_epsanet.run import main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().parent / 'standin_timm_script.py'
SCRIPT_ARGS = ['--model', 'epsanet50', '--num-classes', '10', '--img-size', '64', '-b', '2']
# epsanet50's parameters (the authors' count, 1000 classes) with a 10-class head instead.
EPSANET50_PARAMS_10_CLASSES = 22_561_715 - (2048 * 1000 + 1000) + (2048 * 10 + 10)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONDONTWRITEBYTECODE='1')
    # The package may be used from the checkout rather than installed.
    env['PYTHONPATH'] = os.pathsep.join(p for p in (str(ROOT), env.get('PYTHONPATH')) if p)
    return env


def _run(cmd, cwd):
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _results(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(line[len('RESULT ') :]) for line in proc.stdout.splitlines() if line.startswith('RESULT ')]


def test_script_alone_does_not_know_epsanet(tmp_path):
    # The control: what the runner fixes. A script importing only timm cannot create the models.
    proc = _run([sys.executable, str(SCRIPT), *SCRIPT_ARGS], cwd=tmp_path)
    assert proc.returncode != 0
    assert 'Unknown model (epsanet50)' in proc.stderr


def test_runner_runs_script_as_main_with_its_args(tmp_path):
    (result,) = _results(_run([sys.executable, '-m', 'timm_epsanet.run', str(SCRIPT), *SCRIPT_ARGS], cwd=tmp_path))
    assert result['name'] == '__main__'
    assert result['argv'] == [str(SCRIPT), *SCRIPT_ARGS]
    assert (result['model'], result['architecture']) == ('EPSANet', 'epsanet50')  # timm's ResNet, subclassed
    assert result['params'] == EPSANET50_PARAMS_10_CLASSES
    assert math.isfinite(result['loss'])
    assert (result['rank'], result['world_size']) == (0, 1)


def test_runner_under_torchrun(tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nnodes=1', '--nproc_per_node=2']
    cmd += ['-m', 'timm_epsanet.run', str(SCRIPT), *SCRIPT_ARGS, '--img-size', '32']
    results = _results(_run(cmd, cwd=tmp_path))
    assert sorted(r['rank'] for r in results) == [0, 1]
    for r in results:
        assert r['world_size'] == 2 and r['name'] == '__main__'
        assert r['architecture'] == 'epsanet50' and r['params'] == EPSANET50_PARAMS_10_CLASSES


def test_runner_missing_script(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / 'train.py'), '--model', 'epsanet50'])
    assert e.value.code == 2
    assert 'script not found' in capsys.readouterr().err


def test_runner_without_script(capsys):
    with pytest.raises(SystemExit) as e:
        main([], prog='python -m timm_epsanet.run')
    assert e.value.code == 2
    assert 'usage: python -m timm_epsanet.run [-h] SCRIPT' in capsys.readouterr().err
