"""Fixtures shared by the weight-loading tests: the authors'-format checkpoint and its reference model."""

import pytest
import timm
import torch
from huggingface_hub import constants

from timm_epsanet import checkpoint_filter_fn

from official_weights import authors_checkpoint, golden_input


@pytest.fixture(scope='session')
def authors_ckpt():
    """What the authors' main.py saves for the deterministic epsanet50 weights (do not modify)."""
    return authors_checkpoint('epsanet50')


@pytest.fixture(scope='session')
def authors_file(tmp_path_factory, authors_ckpt):
    """``authors_ckpt`` written with torch.save, as main.py writes model_best.pth.tar."""
    path = tmp_path_factory.mktemp('ckpt') / 'model_best.pth.tar'
    torch.save(authors_ckpt, path)
    return path


@pytest.fixture(scope='session')
def reference(authors_ckpt):
    """epsanet50 with the authors' weights loaded directly, and its logits on the golden input."""
    model = timm.create_model('epsanet50').eval()
    model.load_state_dict(checkpoint_filter_fn(authors_ckpt, model), strict=True)
    with torch.no_grad():
        return model, model(golden_input())


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """Nothing may use the Hub: offline mode and an empty cache make any attempt fail loudly."""
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hf-cache'))


@pytest.fixture(scope='session')
def weights(authors_ckpt):
    """The authors' deterministic epsanet50 weights as a plain state dict (authors' names)."""
    return {k.removeprefix('module.'): v for k, v in authors_ckpt['state_dict'].items()}
