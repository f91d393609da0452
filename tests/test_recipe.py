"""The shipped train.py recipes reproduce the authors' ImageNet recipe (murufeng/EPSANet main.py).

The recipe, from the authors' main.py and loss.py: SGD, momentum 0.9 (not Nesterov), lr 0.1 at a
global batch of 256, weight decay 1e-4 on every parameter, 120 epochs with lr x0.1 every 30 epochs,
label smoothing 0.1, RandomResizedCrop(224) + horizontal flip for training, resize 256 / center
crop 224 for evaluation, no EMA, no mixup. Each YAML is read the way timm's train.py reads it and
handed to timm's own optimizer, scheduler and transform factories, whose products are compared with
that recipe. A few seconds.
"""

from argparse import Namespace

import pytest
import timm
import torch
import yaml
from timm.data import resolve_data_config
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from torchvision import transforms

from timm_epsanet.recipes import list_recipes, recipe_path

MODELS = ['epsanet101', 'epsanet101_large', 'epsanet50', 'epsanet50_large']
GPUS = 8  # the authors trained on 8 GPUs


def _recipe(name):
    with open(recipe_path(name)) as f:
        return yaml.safe_load(f)


def test_every_model_has_a_recipe():
    assert list_recipes() == MODELS == sorted(timm.list_models('epsanet*'))
    with pytest.raises(ValueError, match="No training recipe for 'resnet50'; recipes exist for: epsanet101"):
        recipe_path('resnet50')


@pytest.mark.parametrize('name', MODELS)
def test_recipe_model_and_batch(name):
    cfg = _recipe(name)
    assert cfg['model'] == name
    assert cfg['device_modules'] == ['timm_epsanet']
    # lr 0.1 at global batch 256: train.py sets lr = lr_base * global batch / lr_base_size when --lr is unset.
    assert 'lr' not in cfg
    assert cfg['batch_size'] * GPUS == cfg['lr_base_size'] == 256
    assert (cfg['lr_base'], cfg['lr_base_scale']) == (0.1, 'linear')


@pytest.mark.parametrize('name', MODELS)
def test_recipe_optimizer(name):
    cfg = _recipe(name)
    args = Namespace(**cfg, lr=cfg['lr_base'])
    model = timm.create_model(name, device='meta')
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **cfg['opt_kwargs'])
    assert type(optimizer) is torch.optim.SGD
    (group,) = optimizer.param_groups  # one group: weight decay on every parameter, BN and biases too
    assert len(group['params']) == len(list(model.parameters()))
    assert (group['lr'], group['momentum'], group['nesterov']) == (0.1, 0.9, False)
    assert (group['weight_decay'], group['dampening']) == (1e-4, 0)


@pytest.mark.parametrize('name', MODELS)
def test_recipe_schedule(name):
    cfg = _recipe(name)
    args = Namespace(**cfg)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=5005)
    assert num_epochs == 120
    for epoch in range(num_epochs):
        scheduler.step(epoch)
        # The authors' adjust_learning_rate: lr * 0.1 ** (epoch // 30).
        assert optimizer.param_groups[0]['lr'] == pytest.approx(0.1 * 0.1 ** (epoch // 30), rel=1e-9), epoch


@pytest.mark.parametrize('name', MODELS)
def test_recipe_loss_and_regularisation(name):
    cfg = _recipe(name)
    assert cfg['smoothing'] == 0.1
    assert cfg['mixup'] == cfg['cutmix'] == 0 and 'cutmix_minmax' not in cfg  # train.py: mixup off
    assert cfg['model_ema'] is False
    assert cfg['drop'] == 0 and cfg['drop_path'] is None
    assert cfg['aa'] is None and cfg['reprob'] == 0 and cfg['color_jitter'] is None


@pytest.mark.parametrize('name', MODELS)
def test_recipe_transforms(name):
    cfg = _recipe(name)
    model = timm.create_model(name, device='meta')
    # As train.py does: data config from the args and the model, then the loader's transform arguments.
    data_config = resolve_data_config(dict(cfg), model=model)
    train_tf = timm.data.create_transform(
        data_config['input_size'],
        is_training=True,
        scale=cfg['scale'],
        ratio=cfg['ratio'],
        hflip=cfg['hflip'],
        vflip=cfg['vflip'],
        color_jitter=cfg['color_jitter'],
        auto_augment=cfg['aa'],
        re_prob=cfg['reprob'],
        interpolation=cfg['train_interpolation'],
        mean=data_config['mean'],
        std=data_config['std'],
    ).transforms
    assert [type(t) for t in train_tf] == [
        RandomResizedCropAndInterpolation,
        transforms.RandomHorizontalFlip,
        MaybeToTensor,
        transforms.Normalize,
    ]
    crop, flip = train_tf[:2]
    assert crop.size == (224, 224) and crop.interpolation == transforms.InterpolationMode.BILINEAR
    assert crop.scale == pytest.approx((0.08, 1.0)) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert flip.p == 0.5
    assert tuple(train_tf[3].mean) == timm.data.IMAGENET_DEFAULT_MEAN
    assert tuple(train_tf[3].std) == timm.data.IMAGENET_DEFAULT_STD

    eval_tf = timm.data.create_transform(**data_config, is_training=False).transforms
    assert [type(t) for t in eval_tf] == [transforms.Resize, transforms.CenterCrop, MaybeToTensor, transforms.Normalize]
    assert eval_tf[0].size == 256 and eval_tf[0].interpolation == transforms.InterpolationMode.BILINEAR
    assert eval_tf[1].size == (224, 224)
    assert data_config['crop_pct'] == 0.875
