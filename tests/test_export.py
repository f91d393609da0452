"""Export and compilation on CPU: TorchScript, ONNX (onnxruntime), torch.compile, channels_last.

Every exported or compiled model is compared with eager PyTorch on the same weights. The expensive
steps (ONNX export ~20 s each, inductor compilation ~60 s) run once per module. About 2 min on 2 CPU cores.
"""

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn as nn

import timm_epsanet  # noqa: F401  (registers the models)

from official_weights import deterministic_state_dict

SIZES = [(1, 3, 64, 64), (2, 3, 97, 131)]  # the second one only works if batch and image size stay dynamic


def create(**kwargs) -> nn.Module:
    overlay = dict(state_dict=deterministic_state_dict('epsanet50'))
    return timm.create_model('epsanet50', pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()


def image(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope='module')
def model() -> nn.Module:
    return create()


# --- TorchScript -----------------------------------------------------------------------------------


def test_torchscript_matches_eager(model):
    scripted = torch.jit.script(model)
    for shape in SIZES:
        x = image(*shape)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), model(x), atol=1e-5, rtol=1e-5)


def test_torchscript_keeps_the_input_check(model):
    scripted = torch.jit.script(model)
    with pytest.raises(torch.jit.Error, match='too small for the output_stride'):
        scripted(image(1, 3, 16, 16))


# --- ONNX ------------------------------------------------------------------------------------------


def export_onnx(module: nn.Module, path) -> ort.InferenceSession:
    """Export with dynamic batch, height and width (images of at least 32 px), open with onnxruntime."""
    batch, height, width = (
        torch.export.Dim('batch'),
        torch.export.Dim('height', min=32),
        torch.export.Dim('width', min=32),
    )
    torch.onnx.export(
        module,
        (image(2, 3, 64, 64),),
        str(path),
        dynamo=True,
        opset_version=18,
        input_names=['image'],
        dynamic_shapes=({0: batch, 2: height, 3: width},),
    )
    return ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])


def onnx_vs_eager(session: ort.InferenceSession, module: nn.Module, shape) -> None:
    x = image(*shape, seed=1)
    outputs = session.run(None, {'image': x.numpy()})
    with torch.no_grad():
        expected = module(x)
    expected = expected if isinstance(expected, (list, tuple)) else [expected]
    assert len(outputs) == len(expected)
    for out, ref in zip(outputs, expected, strict=True):
        assert out.shape == tuple(ref.shape)
        np.testing.assert_allclose(out, ref.numpy(), atol=1e-4, rtol=1e-4)


def test_onnx_classifier(model, tmp_path):
    session = export_onnx(model, tmp_path / 'epsanet50.onnx')
    for shape in SIZES:
        onnx_vs_eager(session, model, shape)


def test_onnx_features_only(tmp_path):
    backbone = create(features_only=True)
    session = export_onnx(backbone, tmp_path / 'epsanet50_features.onnx')
    assert len(session.get_outputs()) == 5
    for shape in SIZES:
        onnx_vs_eager(session, backbone, shape)


# --- torch.compile ---------------------------------------------------------------------------------


def test_torch_compile_matches_eager(model):
    x = image(2, 3, 64, 64)
    compiled = torch.compile(model, backend='inductor', dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)


# --- channels_last ---------------------------------------------------------------------------------


def test_channels_last_matches_contiguous():
    model = create()
    x = image(2, 3, 97, 131)
    with torch.no_grad():
        expected = model(x)
        features = model.forward_features(x)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x_cl), expected, atol=1e-4, rtol=1e-4)  # channels_last input only
        model = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x_cl), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.forward_features(x_cl), features, atol=1e-4, rtol=1e-4)
