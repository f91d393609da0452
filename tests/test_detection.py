"""torchvision's Mask R-CNN on an EPSANet-50 feature pyramid: the README example, a training step, inference.

Small images (128-160 px) and few proposals keep it to about 10 s on 2 CPU cores.
"""

import re
from pathlib import Path

import pytest
import torch
from torchvision.models.detection import MaskRCNN

README = Path(__file__).parent.parent / 'README.md'
LOSSES = {'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness', 'loss_rpn_box_reg'}


def readme_example() -> str:
    """The python block of the README section "Backbone for detection and segmentation"."""
    text = README.read_text()
    section = text.split('## Backbone for detection and segmentation', 1)[1].split('\n## ', 1)[0]
    blocks = re.findall(r'```python\n(.*?)```', section, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


@pytest.fixture(scope='module')
def example() -> dict:
    """Runs the README example and returns its namespace."""
    namespace: dict = {'__name__': 'readme_example'}
    torch.manual_seed(0)
    exec(compile(readme_example(), str(README), 'exec'), namespace)
    return namespace


def test_readme_example(example):
    (detections,) = example['detections']
    assert {'boxes', 'labels', 'scores', 'masks'} <= detections.keys()
    backbone = example['model'].backbone
    assert backbone.out_channels == 256
    with torch.no_grad():
        pyramid = backbone(torch.rand(1, 3, 128, 160))
    assert list(pyramid) == ['0', '1', '2', '3', 'pool']
    assert [tuple(f.shape[-2:]) for f in pyramid.values()] == [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]
    assert all(f.shape[1] == 256 for f in pyramid.values())


def images_and_targets():
    """Two small images, each with a filled rectangle as its object (box and mask agree)."""
    generator = torch.Generator().manual_seed(0)
    images, targets = [], []
    for (h, w), (x0, y0, x1, y1), label in [((128, 160), (20, 30, 90, 100), 1), ((144, 128), (40, 16, 120, 80), 2)]:
        image = torch.rand(3, h, w, generator=generator) * 0.2
        image[:, y0:y1, x0:x1] += 0.7
        mask = torch.zeros(1, h, w, dtype=torch.uint8)
        mask[:, y0:y1, x0:x1] = 1
        images.append(image)
        targets.append(
            {
                'boxes': torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32),
                'labels': torch.tensor([label]),
                'masks': mask,
            }
        )
    return images, targets


def small_mask_rcnn(backbone_cls) -> MaskRCNN:
    torch.manual_seed(0)
    return MaskRCNN(
        backbone_cls('epsanet50'),
        num_classes=3,
        min_size=128,
        max_size=160,
        rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=50,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=20,
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=32,
        box_score_thresh=0.0,  # untrained scores are low; keep detections so the mask branch runs
        box_detections_per_img=5,
    )


def test_mask_rcnn_train_step_and_inference(example):
    model = small_mask_rcnn(example['EPSANetFPN'])
    images, targets = images_and_targets()

    model.train()
    losses = model(images, targets)
    assert set(losses) == LOSSES
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    body = model.backbone.body
    grads = {n: p.grad for n, p in body.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # The loss reaches the first and the last stage, through the PSA branches.
    for name in ('conv1.weight', 'layer1.0.conv2.conv_4.weight', 'layer4.2.conv2.conv_1.weight'):
        assert grads[name].abs().sum() > 0, name

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for out, image in zip(outputs, images, strict=True):
        assert out.keys() == {'boxes', 'labels', 'scores', 'masks'}
        n = len(out['boxes'])
        assert 1 <= n <= 5
        assert out['boxes'].shape == (n, 4) and out['scores'].shape == (n,) and out['labels'].shape == (n,)
        assert out['masks'].shape == (n, 1, *image.shape[-2:])
        assert ((out['labels'] >= 1) & (out['labels'] <= 2)).all()
        assert torch.isfinite(out['boxes']).all() and ((out['masks'] >= 0) & (out['masks'] <= 1)).all()
