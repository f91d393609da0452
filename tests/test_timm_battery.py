"""timm's own model test battery (``tests/test_models.py`` of the installed timm's sdist), unmodified.

The sdist of the installed timm version is fetched from PyPI with pip, and its ``test_models.py`` runs
in a subprocess with this package's pytest plugin (``timm_epsanet.testing.timm_battery``) on
``epsanet50`` and ``epsanet101``: forward, backward, default cfgs, TorchScript, features_only,
forward_intermediates, FX forward/backward/TorchScript and the two pretrained-loading tests (from an
offline Hugging Face cache that the plugin fills). The Large variants are the same block class with
other arguments, so they are left out for time; the prune contract test (97 s per model) too.

The battery costs about 200 s of CPU time (the other tests here a few seconds). Deselect it with
``-m "not timm_battery"``; it is skipped when PyPI is not reachable.
"""

import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from timm_epsanet.testing.timm_battery import cache_test_weights, list_models_with_epsanet

ROOT = Path(__file__).resolve().parents[1]
MODELS = ('epsanet50', 'epsanet101')
# The tests of timm's test_models.py that apply to a classification CNN with pretrained configs, with
# their parameter ids' batch size and whether they take the model name with its pretrained tag.
TESTS = {
    'test_model_forward': (1, False),
    'test_model_backward': (2, False),
    'test_model_default_cfgs': (1, True),
    'test_model_load_pretrained': (1, True),
    'test_model_features_pretrained': (1, True),
    'test_model_forward_torchscript': (1, False),
    'test_model_forward_features': (1, False),
    'test_model_forward_intermediates_features': (1, False),
    'test_model_forward_intermediates': (1, False),
    'test_model_forward_fx': (1, False),
    'test_model_backward_fx': (2, False),
    'test_model_forward_fx_torchscript': (1, False),
}
SELECTION = '(epsanet50 or epsanet101) and not large and not prune'


def _timm_tests(tmp_path: Path) -> Path:
    """Download the installed timm version's sdist and unpack its tests and pytest config."""
    version = timm.__version__
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:']
    cmd += ['--disable-pip-version-check', '-d', str(tmp_path), f'timm=={version}']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    sdists = list(tmp_path.glob('timm-*.tar.gz'))
    if proc.returncode != 0 or not sdists:
        pytest.skip(f'cannot download the timm {version} sdist from PyPI: {proc.stderr.strip()[-300:]}')
    with tarfile.open(sdists[0]) as tar:
        # Only the tests and pytest's config: timm itself must come from the installed package.
        members = [m for m in tar.getmembers() if m.name.split('/')[1:2] in (['tests'], ['pyproject.toml'])]
        safe = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}
        tar.extractall(tmp_path / 'sdist', members=members, **safe)
    (root,) = (tmp_path / 'sdist').iterdir()
    return root


@pytest.mark.timm_battery
def test_timm_model_battery(tmp_path):
    root = _timm_tests(tmp_path)
    report = tmp_path / 'report.xml'
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE='1')
    env['PYTHONPATH'] = os.pathsep.join(p for p in (str(ROOT), env.get('PYTHONPATH')) if p)
    # On GitHub runners timm's file drops its pretrained tests; they must run here.
    env.pop('GITHUB_ACTIONS', None)
    cmd = [sys.executable, '-m', 'pytest', '-p', 'no:cacheprovider', '-p', 'timm_epsanet.testing.timm_battery']
    cmd += ['tests/test_models.py', '-k', SELECTION, '-q', f'--junitxml={report}']
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]

    outcomes = {}
    for case in ET.parse(report).getroot().iter('testcase'):
        result = [child.tag for child in case if child.tag in ('failure', 'error', 'skipped')]
        outcomes[case.get('name')] = result[0] if result else 'passed'
    expected = {
        f'{test}[{batch}-{model}{".in1k" if tagged else ""}]'
        for test, (batch, tagged) in TESTS.items()
        for model in MODELS
    }
    assert set(outcomes) == expected, proc.stdout[-3000:]
    assert all(outcome == 'passed' for outcome in outcomes.values()), outcomes


def test_plugin_cache_loads_offline_through_hf_hub_id(tmp_path, monkeypatch):
    # What the plugin gives timm's pretrained tests: weights found under the model's hf_hub_id in an
    # offline cache, through timm's own Hub loading path, bit for bit.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    path = cache_test_weights(tmp_path, 'epsanet50.in1k')
    assert (
        path == tmp_path / 'models--timm-epsanet--epsanet50.in1k' / 'snapshots' / path.parent.name / 'model.safetensors'
    )
    model = timm.create_model('epsanet50', pretrained=True)
    cached = load_file(path)
    loaded = model.state_dict()
    assert set(cached) == set(loaded)
    assert all(torch.equal(loaded[k], v) for k, v in cached.items())
    # Not a re-initialised model: the plugin's weights are seed 0, this model's init differs.
    assert not torch.equal(timm.create_model('epsanet50').conv1.weight, cached['conv1.weight'])


def test_plugin_adds_epsanet_to_resnet_module_filters():
    resnet_family = list_models_with_epsanet(module=['resnet', 'regnet'])
    assert {'epsanet50', 'epsanet101', 'resnet50'} <= set(resnet_family)
    assert not set(list_models_with_epsanet(module=['regnet'])) & {'epsanet50', 'epsanet101'}
    assert list_models_with_epsanet('epsanet*') == timm.list_models('epsanet*')
