"""Empty batches (DDP's uneven last batch, detection code paths) on every PSA path, forward and backward.

The truth is the reference path (``forward_reference``, plain PyTorch ops), which handles an empty batch
as ``resnet50`` does: each fast path must give the same output shape and the same (zero) gradients.
Empty tensors cost nothing to compute, so the maps here are full size, to reach every choice the CPU
path makes (merged weight gradients of three branches need 56x56 outputs). About 15 s on 2 cores.
"""

import copy

import pytest
import timm
import torch

from timm_epsanet import PyramidSqueezeAttention

# (name, map size, stride, dilation, memory format) of the layer cases; the sizes pick the CPU path's
# choices: 56x56 merges the weight gradients of three branches, 28x28 of two, 7x7 of none.
CASES = {
    'stage1 56x56 (three merged weight grads)': (56, 1, 1, torch.contiguous_format),
    'stage2 28x28 stride 2': (56, 2, 1, torch.contiguous_format),
    'stage3 14x14 (two merged)': (14, 1, 1, torch.contiguous_format),
    'stage4 7x7 dilated (none merged)': (7, 1, 2, torch.contiguous_format),
    'channels_last 28x28': (28, 1, 1, torch.channels_last),
}


def _psa_pair(stride=1, dilation=1, memory_format=torch.contiguous_format):
    """A reference PSA module and a fast one with the same parameters, in ``memory_format``."""
    torch.manual_seed(0)
    reference = PyramidSqueezeAttention(64, 64, stride=stride, dilation=dilation, impl='reference')
    fast = copy.deepcopy(reference)
    fast.impl = 'fast'
    return reference.to(memory_format=memory_format), fast.to(memory_format=memory_format)


@pytest.mark.parametrize('case', sorted(CASES))
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_psa_layer_empty_batch_forward_backward(case, mode):
    """Under autograd (the fast path's custom autograd node) and without (depthwise / grouped forwards)."""
    size, stride, dilation, memory_format = CASES[case]
    reference, fast = _psa_pair(stride, dilation, memory_format)
    x = torch.randn(0, 64, size, size).to(memory_format=memory_format)
    outputs, grads = {}, {}
    for name, module in (('reference', reference), ('fast', fast)):
        module.train(mode == 'train')
        with torch.no_grad():
            outputs[name, 'no_grad'] = module(x)
        x_in = x.clone().requires_grad_()
        y = module(x_in)
        y.sum().backward()
        outputs[name, 'grad'] = y
        grads[name] = {'input': x_in.grad, **{n: p.grad for n, p in module.named_parameters()}}
    expected = (0, 64, (size - 1) // stride + 1, (size - 1) // stride + 1)
    for key, y in outputs.items():
        assert y.shape == expected, key
    assert grads['fast'].keys() == grads['reference'].keys()
    for name, grad in grads['reference'].items():
        assert grad is not None and grads['fast'][name] is not None, name
        assert grads['fast'][name].shape == grad.shape, name
        torch.testing.assert_close(grads['fast'][name], grad, rtol=0, atol=0, msg=name)


def test_psa_layer_empty_batch_torchscript():
    """TorchScript's path (plain autograd through the branch convolutions), forward and backward."""
    _, fast = _psa_pair()
    scripted = torch.jit.script(fast)
    x = torch.randn(0, 64, 56, 56, requires_grad=True)
    y = scripted(x)
    y.sum().backward()
    assert y.shape == (0, 64, 56, 56) and x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in fast.parameters())


def test_model_empty_batch_matches_reference():
    """The issue's case: ``epsanet50`` with an empty batch, forward and backward, train and eval modes."""
    torch.manual_seed(0)
    reference = timm.create_model('epsanet50', psa_impl='reference')
    fast = timm.create_model('epsanet50')
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(0, 3, 224, 224)
    for mode in (False, True):  # eval, then train (whose BatchNorm sees the empty batch)
        for model in (reference, fast):
            model.train(mode).zero_grad()
            with torch.no_grad():
                assert model(x).shape == (0, 1000)
            logits = model(x.clone().requires_grad_())
            logits.sum().backward()
            assert logits.shape == (0, 1000)
            features = model.forward_intermediates(x, intermediates_only=True)
            assert [f.shape[0] for f in features] == [0] * 5
        for (name, p_ref), (_, p_fast) in zip(reference.named_parameters(), fast.named_parameters(), strict=True):
            torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=0, atol=0, msg=f'{name} (train={mode})')
        # BatchNorm treats the empty batch alike on both paths (running statistics included)
        for (name, b_ref), (_, b_fast) in zip(reference.named_buffers(), fast.named_buffers(), strict=True):
            torch.testing.assert_close(b_fast, b_ref, rtol=0, atol=0, equal_nan=True, msg=f'{name} (train={mode})')
