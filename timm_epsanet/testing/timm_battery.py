"""pytest plugin: run timm's own ``tests/test_models.py``, unmodified, against the EPSANet models.

Usage (``<sdist>`` is the unpacked source distribution of the installed timm version)::

    pytest -p timm_epsanet.testing.timm_battery <sdist>/tests/test_models.py -k "epsanet and not prune"

timm builds its test parameter lists when ``test_models.py`` is imported, from its model registry, so
the plugin does three things before that happens:

* imports ``timm_epsanet``, which registers the models with timm;
* adds this package's model module to the module filters of the tests that select models by module
  name (``FEAT_INTER_FILTERS``: ``forward_intermediates``, the ``features_only`` getter and pruning).
  Whenever such a filter asks for timm's ``resnet`` module, ``epsanet`` is added, because every EPSANet
  is an instance of timm's ``ResNet`` and supports what the filter is meant to select;
* points huggingface_hub at a temporary, offline cache holding weights for every EPSANet pretrained
  config that a selected test will load, so ``test_model_load_pretrained`` and
  ``test_model_features_pretrained`` run timm's real ``hf_hub_id`` loading path with no network.
  No weights are published on the Hub, so the cached weights are a freshly initialised model
  (seed 0), written in the Hub's cache layout as ``model.safetensors``.
"""

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
import timm
import timm.models
import timm.models._registry
import torch
from safetensors.torch import save as save_safetensors

import timm_epsanet  # noqa: F401  (registers the models with timm)
from timm_epsanet.epsanet import HUB_ORGANIZATION

# Module name under which timm lists our models (the last component of ``timm_epsanet.epsanet``).
EPSANET_MODULE = 'epsanet'
# timm's module whose models ours stand in for in module-filtered tests.
PEER_MODULE = 'resnet'
# timm's tests that create models with ``pretrained=True``.
PRETRAINED_TESTS = ('test_model_load_pretrained', 'test_model_features_pretrained')
# Any 40-hex string works as a commit of a cache snapshot; a fixed one keeps the layout reproducible.
_SNAPSHOT_COMMIT = hashlib.sha1(b'timm-epsanet test weights').hexdigest()

_ORIGINAL_LIST_MODELS = timm.models._registry.list_models
_saved_env: Dict[str, Optional[str]] = {}
_saved_constants: Dict[str, Any] = {}
_cache_root: Optional[Path] = None


def list_models_with_epsanet(*args: Any, **kwargs: Any) -> List[str]:
    """``timm.list_models`` that also lists our models when a module filter asks for timm's ResNets."""
    module = kwargs.get('module', args[1] if len(args) > 1 else '')
    if isinstance(module, str):
        return _ORIGINAL_LIST_MODELS(*args, **kwargs)
    module = list(module)
    if PEER_MODULE in module and EPSANET_MODULE not in module:
        module.append(EPSANET_MODULE)
    if 'module' in kwargs:
        kwargs['module'] = module
    else:
        args = (args[0], module, *args[2:])
    return _ORIGINAL_LIST_MODELS(*args, **kwargs)


@contextmanager
def _patched_list_models() -> Iterator[None]:
    """Swap ``list_models`` where test modules import it from, while a test module is imported."""
    owners = (timm, timm.models, timm.models._registry)
    saved = [owner.list_models for owner in owners]
    for owner in owners:
        owner.list_models = list_models_with_epsanet
    try:
        yield
    finally:
        for owner, fn in zip(owners, saved, strict=True):
            owner.list_models = fn


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """Import test modules (where timm's parameter lists are built) with the extended filters."""
    if not isinstance(collector, pytest.Module):
        return (yield)
    with _patched_list_models():
        return (yield)


def write_hub_cache_entry(cache_dir: Path, repo_id: str, filename: str, data: bytes) -> Path:
    """Write one file into a Hugging Face Hub cache, in the documented cache layout.

    ``models--ORG--REPO/blobs/<sha256>`` holds the bytes, ``snapshots/<commit>/<filename>`` links to the
    blob and ``refs/main`` names the commit, which is what ``hf_hub_download`` reads when offline.
    """
    repo_dir = Path(cache_dir) / ('models--' + repo_id.replace('/', '--'))
    blob = repo_dir / 'blobs' / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    snapshot_file = repo_dir / 'snapshots' / _SNAPSHOT_COMMIT / filename
    snapshot_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        snapshot_file.symlink_to(os.path.relpath(blob, snapshot_file.parent))
    except OSError:  # no symlinks (e.g. Windows without developer mode): the Hub client copies too
        shutil.copyfile(blob, snapshot_file)
    (repo_dir / 'refs').mkdir(exist_ok=True)
    (repo_dir / 'refs' / 'main').write_text(_SNAPSHOT_COMMIT)
    return snapshot_file


def cache_test_weights(cache_dir: Path, model_name: str) -> Path:
    """Cache deterministic weights (seed 0, fresh init) of an EPSANet pretrained config under its hf_hub_id."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(f'{model_name!r} has no pretrained config with a Hugging Face Hub id.')
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(model_name)
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    data = save_safetensors(state_dict, metadata={'format': 'pt'})
    return write_hub_cache_entry(cache_dir, cfg.hf_hub_id, 'model.safetensors', data)


def _set_hub_env(name: str, value: str) -> None:
    _saved_env.setdefault(name, os.environ.get(name))
    os.environ[name] = value


def pytest_configure(config: pytest.Config) -> None:
    """Point huggingface_hub at an empty temporary cache, offline (filled once the tests are known)."""
    global _cache_root
    from huggingface_hub import constants

    _cache_root = Path(tempfile.mkdtemp(prefix='timm_epsanet_hf_'))
    hub_cache = _cache_root / 'hub'
    hub_cache.mkdir()
    # The env serves subprocesses; huggingface_hub read it when timm imported it, so set its constants too.
    _set_hub_env('HF_HOME', str(_cache_root))
    _set_hub_env('HF_HUB_CACHE', str(hub_cache))
    _set_hub_env('HF_HUB_OFFLINE', '1')
    _saved_constants.update(HF_HUB_CACHE=constants.HF_HUB_CACHE, HF_HUB_OFFLINE=constants.HF_HUB_OFFLINE)
    constants.HF_HUB_CACHE = str(hub_cache)
    constants.HF_HUB_OFFLINE = True
    config.addinivalue_line('markers', 'timeout(seconds): used by timm tests (pytest-timeout need not be installed)')


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: List[pytest.Item]) -> None:
    """Cache weights for the EPSANet configs that the selected (not deselected) pretrained tests load."""
    names = set()
    for item in items:
        callspec = getattr(item, 'callspec', None)
        if callspec is None or getattr(item, 'originalname', '') not in PRETRAINED_TESTS:
            continue
        name = callspec.params.get('model_name', '')
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is not None and (cfg.hf_hub_id or '').startswith(HUB_ORGANIZATION + '/'):
            names.add(name)
    hub_cache = Path(os.environ['HF_HUB_CACHE'])
    for name in sorted(names):
        cache_test_weights(hub_cache, name)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Restore the environment and remove the temporary cache."""
    global _cache_root
    from huggingface_hub import constants

    for name, value in _saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    for name, value in _saved_constants.items():
        setattr(constants, name, value)
    _saved_env.clear()
    _saved_constants.clear()
    if _cache_root is not None:
        shutil.rmtree(_cache_root, ignore_errors=True)
        _cache_root = None


__all__ = ['list_models_with_epsanet', 'write_hub_cache_entry', 'cache_test_weights']
