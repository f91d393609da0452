"""The port computes what the authors' code computes, for the same weights."""

import pytest
import timm
import torch
from safetensors.torch import load_file

from timm_epsanet import PyramidSqueezeAttention, checkpoint_filter_fn

from official_weights import GOLDEN, authors_checkpoint, golden_input, official_keys

TOL = 1e-4


@pytest.fixture(scope='module', params=['epsanet50', 'epsanet101'])
def loaded(request):
    arch = request.param
    model = timm.create_model(arch).eval()
    # Through the package's own conversion path, from the authors' main.py checkpoint format.
    state_dict = checkpoint_filter_fn(authors_checkpoint(arch), model)
    model.load_state_dict(state_dict, strict=True)
    return arch, model, load_file(GOLDEN[arch])


def test_recipe_input_matches_fixture(loaded):
    _, _, golden = loaded
    assert torch.equal(golden_input(), golden['input'])


def test_state_dict_names_and_shapes_match_authors(loaded):
    arch, model, _ = loaded
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_keys(arch)


def test_logits_and_stages_match_golden(loaded):
    _, model, golden = loaded
    x = golden['input']
    with torch.no_grad():
        stages = model.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        logits = model(x)
    for i, feat in enumerate(stages, start=1):
        ref = golden[f'layer{i}']
        assert feat.shape == ref.shape
        torch.testing.assert_close(feat, ref, rtol=0, atol=TOL * max(1.0, ref.abs().max().item()))
    assert logits.shape == golden['logits'].shape
    torch.testing.assert_close(logits, golden['logits'], rtol=0, atol=TOL)


def test_golden_check_is_sharp(loaded, monkeypatch):
    """A port that concatenates the branches in natural order must fail the golden check."""
    _, model, golden = loaded

    def natural_order(self, x):
        out = PyramidSqueezeAttention.forward(self, x)
        return torch.cat(out.chunk(self.num_branches, dim=1)[::-1], dim=1)

    monkeypatch.setattr(PyramidSqueezeAttention, '__call__', natural_order)
    with torch.no_grad():
        stages = model.forward_intermediates(golden['input'], indices=[1, 4], intermediates_only=True)
    assert (stages[0] - golden['layer1']).abs().max() > 1e-2
    assert (stages[1] - golden['layer4']).abs().max() > 1e-2
