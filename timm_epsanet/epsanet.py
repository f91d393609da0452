"""EPSANet: ResNet with Pyramid Squeeze Attention (PSA) blocks

A timm port of EPSANet. The bottleneck's 3x3 convolution is replaced by a PSA module: several
convolutions with growing kernels and groups look at the same input, one squeeze-excite module
scores every branch, and a softmax across the branches weighs them before they are concatenated.

The port computes what the authors' PyTorch code computes (checked against golden outputs of
their `epsanet50` / `epsanet101` in tests/) and keeps their state dict names, so checkpoints
written by their `main.py` load unchanged.

Papers:
* `EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network`
    - https://arxiv.org/abs/2105.14447

Official impl: https://github.com/murufeng/EPSANet (no pretrained weights were ever released)
"""

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureListNet
from timm.models._helpers import clean_state_dict
from timm.models.resnet import ResNet

from .checkpoint_io import describe_keys, with_file_weights
from .layers import PyramidSqueezeAttention
from .ops import caller_layout, fast_layout, install_channels_last_stem

__all__ = ['PyramidSqueezeAttention', 'EPSABottleneck', 'EPSANet', 'checkpoint_filter_fn', 'HUB_ORGANIZATION']

# The one place that says where this package's weights live on the Hugging Face Hub.
# Publishing under another organisation is a change of this line.
HUB_ORGANIZATION = 'timm-epsanet'


def _check_downsample_input(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Return ``x``, or refuse a map too small to downsample (padding alone would make the output).

    Each stride-2 stage needs at least 2 pixels per side, so an image side must be more than half the
    network's output stride (17 at output_stride 32, 9 at 16, 5 at 8).
    """
    height, width = x.shape[-2], x.shape[-1]
    if height < stride or width < stride:
        raise ValueError(
            f'EPSANet: a {height}x{width} feature map is too small to downsample by {stride}: the input image '
            f'is too small for the output_stride (each side must be more than half of it, e.g. at least 17 '
            f'pixels at output_stride=32).'
        )
    return x


# A leaf for FX tracing: the check runs on real shapes when the graph runs. It returns x so that FX
# feature extraction (which drops nodes without users) keeps it.
torch.fx.wrap('_check_downsample_input')
# A leaf too: the PSA's device-dependent layout choice is made when the graph runs.
torch.fx.wrap('fast_layout')


class EPSABottleneck(nn.Module):
    """ResNet bottleneck whose 3x3 convolution is a Pyramid Squeeze Attention module.

    Takes the block arguments timm's ``ResNet`` passes to every block. ``cardinality`` and
    ``base_width`` set the bottleneck width as in ResNeXt (width = planes * base_width / 64 * cardinality),
    which is how the wide "Large" variants are built; the PSA's own groups come from ``psa_groups``.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        cardinality: int = 1,
        base_width: int = 64,
        reduce_first: int = 1,
        dilation: int = 1,
        first_dilation: Optional[int] = None,
        act_layer: Type[nn.Module] = nn.ReLU,
        norm_layer: Type[nn.Module] = nn.BatchNorm2d,
        attn_layer: Optional[Type[nn.Module]] = None,
        aa_layer: Optional[Type[nn.Module]] = None,
        drop_block: Optional[Type[nn.Module]] = None,
        drop_path: Optional[nn.Module] = None,
        psa_kernels: Sequence[int] = (3, 5, 7, 9),
        psa_groups: Sequence[int] = (1, 4, 8, 16),
        psa_rd_ratio: float = 1.0 / 16,
        psa_impl: str = 'fast',
        device=None,
        dtype=None,
    ):
        """
        Args:
            inplanes: Input channels.
            planes: Base channels; the block outputs ``planes * 4``.
            stride: Stride, applied in the PSA branch convolutions.
            downsample: Shortcut projection, or None for identity.
            cardinality: ResNeXt-style width multiplier (with ``base_width``).
            base_width: ResNeXt-style base width.
            reduce_first: Reduction of the first 1x1 conv's output width.
            dilation: Dilation of the PSA branches in this stage.
            first_dilation: Dilation of the PSA branches in this block (the first block of a stage).
            act_layer: Activation layer class.
            norm_layer: Normalization layer class.
            attn_layer: Not supported: the PSA module is this block's attention.
            aa_layer: Not supported by the PSA branches.
            drop_block: DropBlock layer class, applied after the PSA's norm.
            drop_path: DropPath layer instance for the residual branch.
            psa_kernels: Kernel size of each PSA branch.
            psa_groups: Groups of each PSA branch.
            psa_rd_ratio: Squeeze-excite reduction inside the PSA module.
            psa_impl: PSA implementation, ``'fast'``, ``'reference'`` or ``'triton'`` (the same function; see
                ``PyramidSqueezeAttention``).
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if attn_layer is not None:
            raise ValueError('EPSABottleneck: attn_layer is not supported, the PSA module is the attention.')
        if aa_layer is not None:
            raise ValueError('EPSABottleneck: aa_layer (anti-aliasing) is not supported by the PSA branches.')

        width = int(math.floor(planes * (base_width / 64)) * cardinality)
        first_planes = width // reduce_first
        outplanes = planes * self.expansion
        first_dilation = first_dilation or dilation

        self.conv1 = nn.Conv2d(inplanes, first_planes, kernel_size=1, bias=False, **dd)
        self.bn1 = norm_layer(first_planes, **dd)
        self.act1 = act_layer(inplace=True)

        self.conv2 = PyramidSqueezeAttention(
            first_planes,
            width,
            kernel_sizes=psa_kernels,
            groups=psa_groups,
            stride=stride,
            dilation=first_dilation,
            rd_ratio=psa_rd_ratio,
            impl=psa_impl,
            **dd,
        )
        self.bn2 = norm_layer(width, **dd)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        self.act2 = act_layer(inplace=True)

        self.conv3 = nn.Conv2d(width, outplanes, kernel_size=1, bias=False, **dd)
        self.bn3 = norm_layer(outplanes, **dd)
        self.act3 = act_layer(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation
        self.drop_path = drop_path

    def zero_init_last(self) -> None:
        """Zero the last norm's weight so the block starts as an identity."""
        if getattr(self.bn3, 'weight', None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = _check_downsample_input(x, self.stride)
        if self.conv2.impl == 'fast':
            # The whole block, shortcut included, runs in the PSA's fast layout: no mixed-layout residual add.
            x = fast_layout(x, self.conv2.conv_1.weight)
        shortcut = x

        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)

        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)

        x = self.conv3(x)
        x = self.bn3(x)

        if self.drop_path is not None:
            x = self.drop_path(x)

        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act3(x)
        return x


class EPSANet(ResNet):
    """timm's ``ResNet`` with EPSA blocks, whose intermediate feature maps come back in the caller's layout.

    On CPU the fast PSA path runs the stem and some blocks channels_last (where that is faster), depending
    on map size, batch and grad mode. ``forward_intermediates`` (and ``features_only``, see
    ``_create_epsanet``) hand the maps back in the input's memory format, so a caller sees the same layout in
    training and inference: NCHW for an NCHW image, channels_last for a channels_last one.
    """

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        """``ResNet.forward_intermediates``, its maps in ``x``'s memory format (same arguments and returns)."""
        out = super().forward_intermediates(x, *args, **kwargs)
        if isinstance(out, tuple):  # (final features, intermediates)
            return caller_layout(out[0], x), [caller_layout(f, x) for f in out[1]]
        return [caller_layout(f, x) for f in out]


# Forward hooks (scriptable, as the feature nets they go on) that hand features_only maps back in the
# input's memory format: one copy per map that ran channels_last on CPU, nothing for the others.
def _feature_list_in_caller_layout(
    module: nn.Module, args: Tuple[torch.Tensor], output: List[torch.Tensor]
) -> List[torch.Tensor]:
    return [caller_layout(f, args[0]) for f in output]


def _feature_dict_in_caller_layout(
    module: nn.Module, args: Tuple[torch.Tensor], output: Dict[str, torch.Tensor]
) -> Dict[str, torch.Tensor]:
    return {name: caller_layout(f, args[0]) for name, f in output.items()}


def _features_in_caller_layout(model: nn.Module) -> None:
    """Make a ``features_only`` model return its maps in the caller's layout, whatever its ``feature_cls``."""
    if isinstance(model, FeatureGetterNet):
        return  # it returns EPSANet.forward_intermediates's maps, already in the caller's layout
    returns_dict = isinstance(model, FeatureDictNet) and not isinstance(model, FeatureListNet)
    returns_dict = returns_dict or getattr(model, 'return_dict', False)  # the 'hook' and 'fx' feature nets
    model.register_forward_hook(_feature_dict_in_caller_layout if returns_dict else _feature_list_in_caller_layout)


def _describe_keys(keys: Sequence[str]) -> str:
    return describe_keys(sorted(keys), limit=8)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Turn an EPSANet checkpoint into a state dict for ``model``, or say exactly why it does not fit.

    Accepts a plain state dict (this package's, or the authors' model), a checkpoint written by the
    authors' ``main.py`` (``{'state_dict': {'module.*': ...}, 'epoch', 'arch', 'best_prec1', 'optimizer'}``)
    and one written by timm's train.py (``state_dict`` / ``state_dict_ema``). DataParallel's ``module.``
    and torch.compile's ``_orig_mod.`` prefixes are removed.

    The classifier and stem conv keys may differ in shape; timm re-initialises or adapts those for
    ``num_classes`` / ``in_chans`` after this filter. Any other missing, unexpected or mis-shaped key
    raises ``ValueError`` naming the keys, so a wrong checkpoint never loads partially.
    """
    if not isinstance(state_dict, dict):
        raise ValueError(f'Expected a checkpoint dict, got {type(state_dict).__name__}.')
    for wrapper_key in ('state_dict', 'model'):
        if isinstance(state_dict.get(wrapper_key), dict):
            state_dict = state_dict[wrapper_key]
            break
    state_dict = clean_state_dict(state_dict)
    state_dict = {k: v for k, v in state_dict.items() if torch.is_tensor(v)}

    expected = model.state_dict()
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    adaptable = tuple(f'{cfg.get(n)}.' for n in ('classifier', 'first_conv') if cfg.get(n))

    missing = set(expected) - set(state_dict)
    # A model built with num_classes=0 has no classifier; timm drops the checkpoint's after this filter.
    unexpected = {k for k in set(state_dict) - set(expected) if not k.startswith(adaptable)}
    # Checkpoints from before BatchNorm tracked its batch count load fine without it.
    missing = {k for k in missing if not k.endswith('num_batches_tracked')}
    mismatched = [
        f'{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}'
        for k in set(state_dict) & set(expected)
        if state_dict[k].shape != expected[k].shape and not k.startswith(adaptable)
    ]
    problems = []
    if missing:
        problems.append(f'missing keys: {_describe_keys(missing)}')
    if unexpected:
        problems.append(f'unexpected keys: {_describe_keys(unexpected)}')
    if mismatched:
        problems.append(f'shape mismatches (checkpoint vs model): {_describe_keys(mismatched)}')
    if problems:
        arch = cfg.get('architecture') or type(model).__name__
        raise ValueError(
            f'Checkpoint does not fit {arch}: '
            + '; '.join(problems)
            + '. Is it a checkpoint of another architecture or variant?'
        )
    return state_dict


def _create_epsanet(variant: str, pretrained: bool = False, **kwargs) -> EPSANet:
    """Build an EPSANet variant (timm's ResNet, subclassed), loading pretrained weights when asked.

    ``psa_impl='reference'`` builds the plain model: the reference PSA forward in every block (see
    ``PyramidSqueezeAttention``) and none of the fast path's layout choices, the stem's included.
    """
    psa_impl = kwargs.pop('psa_impl', 'fast')
    kwargs['block_args'] = dict(kwargs.get('block_args') or {}, psa_impl=psa_impl)
    if pretrained:  # file= weights are read by the package: safely, with one clear line for a bad file
        kwargs = with_file_weights(variant, kwargs)
    try:
        model = build_model_with_cfg(
            EPSANet,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            **kwargs,
        )
    except Exception as e:
        hub_error = _weights_unavailable_error(variant, e, kwargs) if pretrained else None
        if hub_error is None:
            raise
        raise hub_error from e
    model.pretrained_cfg.pop('state_dict', None)  # loaded into the model; a copy in the cfg only holds memory
    if psa_impl == 'fast':
        install_channels_last_stem(model)
    if kwargs.get('features_only'):
        _features_in_caller_layout(model)
    return model


def _weights_unavailable_error(variant: str, error: Exception, kwargs: Dict[str, Any]) -> Optional[Exception]:
    """A clear error when the Hub cannot provide a variant's weights, else None."""
    try:
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    if not isinstance(error, (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)):
        return None
    from timm.models._builder import resolve_pretrained_cfg

    pretrained_cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get('pretrained_cfg'),
        pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'),
    )
    hub_id = pretrained_cfg.hf_hub_id
    tag = f'{pretrained_cfg.architecture}.{pretrained_cfg.tag}' if pretrained_cfg.tag else variant
    if isinstance(error, LocalEntryNotFoundError):
        reason = 'they are not in the local Hugging Face cache and the Hub could not be reached (offline?)'
    else:
        reason = 'the Hub has no such repository, revision or weights file'
    return RuntimeError(
        f'Pretrained weights for {tag} are not available from the Hugging Face Hub repository {hub_id!r}: '
        f'{reason}. Weights for this tag may not be published yet (see the timm-epsanet README, "Weights"); '
        f'use pretrained=False, or load a local file with pretrained_cfg_overlay=dict(file=PATH).'
    )


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 0.875,
        'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1',
        'classifier': 'fc',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2105.14447',
        'paper_name': 'EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network',
        'origin_url': 'https://github.com/murufeng/EPSANet',
        **kwargs,
    }


_WEIGHTS_NOTE = (
    "Weights are trained with timm train.py or the authors' main.py (ImageNet-1k, 224x224) and "
    "converted to safetensors by timm-epsanet's hub_upload.py; the authors released no weights."
)
_LARGE_NOTE = (
    " Architecture reconstructed from the paper's published params/FLOPs (2x bottleneck width, "
    "PSA kernels 3/5/5/7, 32 groups per branch); the authors' code never contained it."
)

default_cfgs = generate_default_cfgs(
    {
        'epsanet50.in1k': _cfg(hf_hub_id=f'{HUB_ORGANIZATION}/epsanet50.in1k', notes=_WEIGHTS_NOTE),
        'epsanet101.in1k': _cfg(hf_hub_id=f'{HUB_ORGANIZATION}/epsanet101.in1k', notes=_WEIGHTS_NOTE),
        'epsanet50_large.in1k': _cfg(
            hf_hub_id=f'{HUB_ORGANIZATION}/epsanet50_large.in1k', notes=_WEIGHTS_NOTE + _LARGE_NOTE
        ),
        'epsanet101_large.in1k': _cfg(
            hf_hub_id=f'{HUB_ORGANIZATION}/epsanet101_large.in1k', notes=_WEIGHTS_NOTE + _LARGE_NOTE
        ),
    }
)

# The authors' "Small" configuration, used by their epsanet50() / epsanet101().
_SMALL_PSA = dict(psa_kernels=(3, 5, 7, 9), psa_groups=(1, 4, 8, 16))
# Reconstruction of "Large": wider bottleneck (ResNeXt 32x4d widths) and 32 groups in every branch.
# Kernels 3/5/5/7 reproduce the paper's 27.90M params / 4.72 GFLOPs and 49.59M / 8.97 GFLOPs exactly (the
# paper's FLOPs count BatchNorm too; conv and linear MACs alone are 4.69 and 8.92 G); 3/5/7/9 would not.
_LARGE_PSA = dict(psa_kernels=(3, 5, 5, 7), psa_groups=(32, 32, 32, 32))


@register_model
def epsanet50(pretrained: bool = False, **kwargs) -> EPSANet:
    """EPSANet-50 ("Small" in the paper): 22.56M params, 3.60 GMACs at 224x224.

    The paper's 3.62 GFLOPs count BatchNorm too; GMACs here count convolutions and linear layers.
    """
    model_args = dict(block=EPSABottleneck, layers=(3, 4, 6, 3), block_args=_SMALL_PSA, zero_init_last=False)
    return _create_epsanet('epsanet50', pretrained, **dict(model_args, **kwargs))


@register_model
def epsanet101(pretrained: bool = False, **kwargs) -> EPSANet:
    """EPSANet-101 ("Small" in the paper): 38.90M params, 6.79 GMACs at 224x224.

    The paper's 6.82 GFLOPs count BatchNorm too; GMACs here count convolutions and linear layers.
    """
    model_args = dict(block=EPSABottleneck, layers=(3, 4, 23, 3), block_args=_SMALL_PSA, zero_init_last=False)
    return _create_epsanet('epsanet101', pretrained, **dict(model_args, **kwargs))


@register_model
def epsanet50_large(pretrained: bool = False, **kwargs) -> EPSANet:
    """EPSANet-50 ("Large"), reconstructed from the paper's numbers: 27.90M params, 4.69 GMACs at 224x224.

    The authors' code never contained this model. Width 2x (cardinality 32 x base width 4),
    PSA kernels 3/5/5/7 with 32 groups per branch reproduce the paper's 27.90M params and 4.72 GFLOPs
    exactly (the paper's FLOPs count BatchNorm too; the 4.69 GMACs count convolutions and linear layers).
    """
    model_args = dict(
        block=EPSABottleneck,
        layers=(3, 4, 6, 3),
        cardinality=32,
        base_width=4,
        block_args=_LARGE_PSA,
        zero_init_last=False,
    )
    return _create_epsanet('epsanet50_large', pretrained, **dict(model_args, **kwargs))


@register_model
def epsanet101_large(pretrained: bool = False, **kwargs) -> EPSANet:
    """EPSANet-101 ("Large"), reconstructed from the paper's numbers: 49.59M params, 8.92 GMACs at 224x224.

    The authors' code never contained this model; see ``epsanet50_large`` for the configuration. It
    reproduces the paper's 49.59M params and 8.97 GFLOPs (BatchNorm included) exactly.
    """
    model_args = dict(
        block=EPSABottleneck,
        layers=(3, 4, 23, 3),
        cardinality=32,
        base_width=4,
        block_args=_LARGE_PSA,
        zero_init_last=False,
    )
    return _create_epsanet('epsanet101_large', pretrained, **dict(model_args, **kwargs))
