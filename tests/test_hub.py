"""The upload round trip through a Hub that lives in this process (tests/fake_hub.py, 127.0.0.1 only).

hub_upload.py pushes the authors' weights; ``timm.create_model(..., pretrained=True)`` downloads them
and must reproduce the source bit for bit; ``HF_HUB_OFFLINE=1`` then loads them from the cache without
a single connection; weights that cannot be had raise an error naming the Hub id. A concurrent run is
refused, and only bytes with the verified sha256 are pushed.
Cost: 16 tests, 58 s CPU (87 s wall on a busy 2-core box) before the last four, which add one export
and ~3 s: a subprocess push, four exports, 90 MB uploads and downloads through the fake Hub, ~13 model builds.
"""

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file, save_file

from timm_epsanet import HUB_ORGANIZATION, publish

from fake_hub import FakeHub
from official_weights import GOLDEN, golden_input

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKEN = 'hf_dummy_token_for_tests'
REPO = f'{HUB_ORGANIZATION}/epsanet50.in1k'  # where epsanet50's pretrained cfg looks


def _point_hub_at(mp: pytest.MonkeyPatch, endpoint: str) -> None:
    # huggingface_hub reads its settings at import time: the constants must follow, both of them.
    mp.setattr(constants, 'ENDPOINT', endpoint)
    mp.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE', endpoint + '/{repo_id}/resolve/{revision}/{filename}')
    mp.setenv('HF_ENDPOINT', endpoint)


@pytest.fixture(scope='module')
def hub(tmp_path_factory):
    """A fake Hub, and huggingface_hub pointed at it with a fresh cache and a dummy token (undone afterwards)."""
    home = tmp_path_factory.mktemp('hf-home')
    with FakeHub() as fake, pytest.MonkeyPatch.context() as mp:
        _point_hub_at(mp, fake.endpoint)
        for name, value in (
            ('HF_HOME', str(home)),
            ('HF_HUB_CACHE', str(home / 'hub')),
            ('HF_TOKEN_PATH', str(home / 'token')),
            ('HF_STORED_TOKENS_PATH', str(home / 'stored_tokens')),
            ('HF_HUB_OFFLINE', False),
        ):
            mp.setattr(constants, name, value)
        for name, value in (
            ('HF_HOME', str(home)),
            ('HF_TOKEN', TOKEN),
            ('HF_HUB_OFFLINE', '0'),
            ('HF_HUB_DISABLE_TELEMETRY', '1'),
            ('HF_HUB_DISABLE_UPDATE_CHECK', '1'),
            ('NO_PROXY', '127.0.0.1,localhost'),
        ):
            mp.setenv(name, value)
        for name in ('HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE', 'HUGGING_FACE_HUB_TOKEN', 'TRANSFORMERS_OFFLINE'):
            mp.delenv(name, raising=False)
        yield fake


@pytest.fixture(scope='module')
def pushed(hub, authors_file, tmp_path_factory):
    """``python hub_upload.py ... --repo-id`` run as users run it, against the fake Hub."""
    out = tmp_path_factory.mktemp('push') / 'folder'
    cmd = [sys.executable, str(REPO_ROOT / 'hub_upload.py'), '--model', 'epsanet50', '--checkpoint', str(authors_file)]
    cmd += ['--output-dir', str(out), '--repo-id', REPO, '--top1', '77.49', '--top5', '93.54']
    proc = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def _assert_matches_reference(model, reference):
    ref_model, ref_logits = reference
    ours, ref = model.state_dict(), ref_model.state_dict()
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    with torch.no_grad():
        logits = model.eval()(golden_input())
    assert torch.equal(logits, ref_logits)
    torch.testing.assert_close(logits, load_file(GOLDEN['epsanet50'])['logits'], rtol=0, atol=1e-4)


def test_push_uploads_the_verified_folder(hub, pushed):
    out, proc = pushed
    files = hub.files(REPO)
    assert sorted(files) == ['.gitattributes', 'README.md', 'config.json', 'model.safetensors']
    for name in ('README.md', 'config.json', 'model.safetensors'):
        assert files[name] == (out / name).read_bytes(), name
    assert 'pushed to timm-epsanet/epsanet50.in1k' in proc.stdout
    # The token came from HF_TOKEN and was sent, but never shown.
    assert f'Bearer {TOKEN}' in hub.auth_headers
    assert TOKEN not in proc.stdout + proc.stderr


def test_pretrained_true_downloads_the_published_weights(hub, pushed, reference):
    before = len(hub.requests)
    model = timm.create_model('epsanet50', pretrained=True)
    assert ('GET', f'/{REPO}/resolve/main/model.safetensors') in hub.requests[before:]
    _assert_matches_reference(model, reference)


def test_hf_hub_prefix(hub, pushed, reference):
    model = timm.create_model(f'hf-hub:{REPO}', pretrained=True)
    _assert_matches_reference(model, reference)
    assert model.pretrained_cfg['tag'] == 'in1k'
    # A new head on top of Hub weights: every other tensor stays the published one.
    model = timm.create_model(f'hf-hub:{REPO}', pretrained=True, num_classes=10)
    assert model.fc.weight.shape == (10, 2048)
    assert torch.equal(model.layer4[2].conv3.weight, reference[0].layer4[2].conv3.weight)


def test_offline_loads_from_cache_without_network(hub, pushed, reference, monkeypatch):
    timm.create_model('epsanet50', pretrained=True)  # make sure the cache holds it, whatever ran before
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')

    def refuse(*args, **kwargs):
        raise AssertionError(f'network access while offline: {args}')

    monkeypatch.setattr(socket.socket, 'connect', refuse)
    before = len(hub.requests)
    _assert_matches_reference(timm.create_model('epsanet50', pretrained=True), reference)
    _assert_matches_reference(timm.create_model(f'hf-hub:{REPO}', pretrained=True), reference)
    assert len(hub.requests) == before


def test_offline_and_not_cached_names_the_hub_id(hub, monkeypatch):
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(RuntimeError) as info:
        timm.create_model('epsanet101', pretrained=True)
    message = str(info.value)
    assert "'timm-epsanet/epsanet101.in1k'" in message and 'epsanet101.in1k' in message
    assert 'not in the local Hugging Face cache' in message and 'not be published' in message
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)


def test_missing_revision_names_the_hub_id(hub, pushed):
    with pytest.raises(RuntimeError, match=f"'{REPO}@v9'.*no such repository, revision") as info:
        timm.create_model('epsanet50', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=f'{REPO}@v9'))
    assert isinstance(info.value.__cause__, RevisionNotFoundError)


def test_repository_without_weights_names_the_hub_id(hub):
    repo = HfApi().create_repo('testorg/no-weights-yet').repo_id  # exists, but holds no weights file
    with pytest.raises(RuntimeError, match="'testorg/no-weights-yet'.*not be published") as info:
        timm.create_model('epsanet50', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=repo))
    assert isinstance(info.value.__cause__, EntryNotFoundError)
    # timm asked for the safetensors file, then for the pickle fallback; the Hub answered EntryNotFound to both.
    assert ('HEAD', f'/{repo}/resolve/main/model.safetensors') in hub.requests
    assert ('HEAD', f'/{repo}/resolve/main/pytorch_model.bin') in hub.requests


def test_missing_repository_names_the_hub_id(hub):
    with pytest.raises(RuntimeError) as info:
        timm.create_model('epsanet50', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id='nobody/epsanet50.x'))
    message = str(info.value)
    assert "'nobody/epsanet50.x'" in message and 'no such repository' in message and 'not be published' in message
    assert isinstance(info.value.__cause__, RepositoryNotFoundError)
    # hf-hub: names are resolved by timm before this package runs: huggingface_hub's own error, with the id.
    with pytest.raises(RepositoryNotFoundError, match='nobody/epsanet50.x'):
        timm.create_model('hf-hub:nobody/epsanet50.x', pretrained=True)


def test_push_to_branch_of_private_repo(hub, authors_file, reference, tmp_path, capsys):
    repo = 'testorg/epsanet50-branch'
    argv = ['--model', 'epsanet50', '--checkpoint', str(authors_file), '--output-dir', str(tmp_path / 'out')]
    argv += ['--repo-id', repo, '--revision', 'v1', '--private', '--commit-message', 'first weights']
    assert publish.main(argv) == 0
    out = capsys.readouterr().out
    assert f'timm.create_model("hf-hub:{repo}", pretrained=True)' in out  # not where the cfg looks: says so
    assert hub.repos[repo].private
    assert 'model.safetensors' in hub.files(repo, 'v1') and 'model.safetensors' not in hub.files(repo, 'main')
    _assert_matches_reference(timm.create_model(f'hf-hub:{repo}@v1', pretrained=True), reference)


def test_refuses_to_push_what_does_not_verify(hub, authors_file, tmp_path, monkeypatch, capsys):
    write_folder = publish.write_folder

    def write_then_corrupt(model, out_dir, **kwargs):
        folder = write_folder(model, out_dir, **kwargs)
        tensors = load_file(folder / 'model.safetensors')
        tensors['fc.bias'][0] += 1.0
        save_file(tensors, folder / 'model.safetensors')
        return folder

    monkeypatch.setattr(publish, 'write_folder', write_then_corrupt)
    repo = 'testorg/never-pushed'
    argv = ['--model', 'epsanet50', '--checkpoint', str(authors_file), '--output-dir', str(tmp_path / 'out')]
    assert publish.main(argv + ['--repo-id', repo]) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: verification failed') and 'fc.bias' in err and err.count('\n') == 1
    assert repo not in hub.repos
    assert not any(repo in path for _, path in hub.requests)


def test_push_to_unreachable_hub_is_one_line(hub, authors_file, tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    _point_hub_at(monkeypatch, f'http://127.0.0.1:{port}')
    argv = ['--model', 'epsanet50', '--checkpoint', str(authors_file), '--output-dir', str(tmp_path / 'out')]
    assert publish.main(argv + ['--repo-id', 'testorg/x']) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'error: could not push to http://127.0.0.1:{port}/testorg/x')
    assert err.count('\n') == 1 and 'Traceback' not in err
    assert (tmp_path / 'out' / 'model.safetensors').is_file()  # the verified folder is kept for a retry


def test_push_refused_offline(hub, pushed, monkeypatch):
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    before = len(hub.requests)
    with pytest.raises(publish.PublishError, match='HF_HUB_OFFLINE is set'):
        publish.push_folder(pushed[0], 'testorg/offline')
    assert len(hub.requests) == before


# --- issue 12: what is pushed is exactly what was verified, and nothing is converted that cannot be pushed ---


def test_concurrent_run_is_refused_and_the_hub_gets_the_verified_bytes(
    hub, authors_file, authors_ckpt, tmp_path, capsys
):
    """A second hub_upload.py into the same folder while the first is about to push: refused, not interleaved."""
    other = tmp_path / 'other.pth'
    state_dict = {k.removeprefix('module.'): v for k, v in authors_ckpt['state_dict'].items()}
    torch.save(dict(state_dict, **{'fc.bias': state_dict['fc.bias'] + 1.0}), other)
    out, repo = tmp_path / 'out', 'testorg/concurrent'
    seen = {}
    push_folder = publish.push_folder

    def second_run_then_push(folder, *args, **kwargs):
        seen['folder'] = {p.name: p.read_bytes() for p in Path(folder).iterdir()}  # what the first run verified
        seen['manifest'] = kwargs.get('manifest')  # the sha256s the push checks the bytes against
        # The second run, started while the first holds its lock (flock locks are per open file, so a run in
        # this process contends exactly as one in another process would).
        argv = ['--model', 'epsanet50', '--checkpoint', str(other), '--output-dir', str(out)]
        seen['second'] = publish.main(argv)
        seen['second_err'] = capsys.readouterr().err
        return push_folder(folder, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(publish, 'push_folder', second_run_then_push)
        argv = ['--model', 'epsanet50', '--checkpoint', str(authors_file), '--output-dir', str(out)]
        assert publish.main(argv + ['--repo-id', repo]) == 0
    assert seen['second'] == 1, seen['second_err']
    assert seen['second_err'].count('\n') == 1 and 'another hub_upload.py run' in seen['second_err']
    files = hub.files(repo)
    for name in ('README.md', 'config.json', 'model.safetensors'):
        assert files[name] == seen['folder'][name] == (out / name).read_bytes(), name
        assert hashlib.sha256(files[name]).hexdigest() == seen['manifest'][name], name
    pushed = safetensors_load(files['model.safetensors'])
    assert all(torch.equal(pushed[k], v) for k, v in state_dict.items())


def test_folder_changed_after_verification_is_not_pushed(hub, pushed, tmp_path):
    """push_folder uploads only bytes whose sha256 is the verified one (publish passes verify_folder's manifest)."""
    verified = publish.folder_manifest(pushed[0])
    folder = tmp_path / 'folder'
    shutil.copytree(pushed[0], folder)
    tensors = load_file(folder / 'model.safetensors')
    tensors['fc.bias'][0] += 1.0
    save_file(tensors, folder / 'model.safetensors')
    repo, before = 'testorg/tampered', len(hub.requests)
    with pytest.raises(publish.PublishError, match='model.safetensors in .* changed since it was verified'):
        publish.push_folder(folder, repo, manifest=verified)
    assert len(hub.requests) == before and repo not in hub.repos


@pytest.mark.parametrize('problem', ['offline', 'no-token'])
def test_push_prerequisites_are_checked_before_converting(problem, hub, authors_file, tmp_path, monkeypatch, capsys):
    if problem == 'offline':
        monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
        expected = 'HF_HUB_OFFLINE is set'
    else:
        monkeypatch.delenv('HF_TOKEN')
        expected = 'no Hugging Face token'
    before = len(hub.requests)
    out = tmp_path / 'out'
    argv = ['--model', 'epsanet50', '--checkpoint', str(authors_file), '--output-dir', str(out)]
    assert publish.main(argv + ['--repo-id', 'testorg/never']) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'error: {expected}') and err.count('\n') == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []  # refused before anything was converted
    assert len(hub.requests) == before
