"""Publish EPSANet weights to the Hugging Face Hub in timm's format (the logic behind ``hub_upload.py``).

The pipeline, one function per step:

1. :func:`load_checkpoint` reads a checkpoint written by the authors' ``main.py``, by timm's ``train.py``
   (``state_dict`` / ``state_dict_ema``), a plain state dict, or a ``.safetensors`` file, without
   unpickling arbitrary objects.
2. :func:`convert_checkpoint` turns it into a state dict with the package's ``checkpoint_filter_fn``.
3. :func:`build_source_model` strictly loads that state dict into ``timm.create_model(model)``.
4. :func:`write_folder` writes ``model.safetensors``, ``config.json`` (timm's ``save_for_hf``) and a
   model card ``README.md`` (timm's ``generate_readme``).
5. :func:`verify_folder` reloads the folder with ``timm.create_model("local-dir:DIR", pretrained=True)``
   and requires bit-identical weights and logits.
6. :func:`push_folder` uploads the verified folder with ``huggingface_hub`` (only when a repo id is given).

Every failure a user can cause raises :class:`PublishError` with a one-line message; the CLI prints it
and exits non-zero.
"""

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = [
    'PublishError',
    'Results',
    'load_checkpoint',
    'convert_checkpoint',
    'build_source_model',
    'model_stats',
    'make_model_card',
    'write_folder',
    'verify_folder',
    'push_folder',
    'publish',
    'main',
]

# What the folder holds; anything else in an existing output folder would be uploaded too, so it is refused.
FOLDER_FILES = ('model.safetensors', 'config.json', 'README.md')

CITATION = """@article{zhang2021epsanet,
  title={EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network},
  author={Zhang, Hu and Zu, Keke and Lu, Jian and Zou, Yuru and Meng, Deyu},
  journal={arXiv preprint arXiv:2105.14447},
  year={2021}
}"""


class PublishError(Exception):
    """A problem with the user's input or environment, described in one line that says what to do."""


@dataclass(frozen=True)
class Results:
    """Evaluation results to state in the model card."""

    top1: Optional[float] = None
    top5: Optional[float] = None
    dataset: str = 'imagenet-1k'


@dataclass
class Checkpoint:
    """A loaded checkpoint and what is known about where it came from."""

    path: Path
    state_dict: Dict[str, Any]
    kind: str  # human readable format description, for the model card
    arch: Optional[str] = None  # architecture name recorded in the checkpoint, if any
    sha256: str = ''


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return ' '.join(text.split())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open('rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str, use_ema: bool = False) -> Checkpoint:
    """Read a checkpoint file safely and pick the weights to publish.

    Pickled checkpoints are read with ``torch.load(weights_only=True)``; only ``argparse.Namespace`` (the
    ``args`` entry of timm train.py checkpoints) is allowed beyond tensors and containers.

    Args:
        path: Checkpoint file (``.pth``, ``.pth.tar``, ``.bin``, ``.safetensors``, ...).
        use_ema: Take the EMA weights (``state_dict_ema`` / ``model_ema``) of a timm train.py checkpoint.

    Raises:
        PublishError: The file is missing or unreadable, or has no EMA weights when they are asked for.
    """
    import torch

    file = Path(path)
    if not file.is_file():
        raise PublishError(f'checkpoint {path!r} does not exist or is not a file; check the --checkpoint path.')
    sha256 = _sha256(file)

    if file.suffix == '.safetensors':
        from safetensors.torch import load_file

        try:
            state_dict = load_file(str(file), device='cpu')
        except Exception as e:
            raise PublishError(
                f'cannot read {path!r} as safetensors ({_one_line(e)}); is the file complete and really safetensors?'
            ) from e
        if use_ema:
            raise PublishError(
                '--use-ema needs a timm train.py checkpoint; a .safetensors file holds one set of weights.'
            )
        return Checkpoint(file, state_dict, 'a safetensors state dict', sha256=sha256)

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(str(file), map_location='cpu', weights_only=True)
    except Exception as e:
        reason = _one_line(e)
        if hasattr(torch.serialization, 'get_unsafe_globals_in_checkpoint'):
            try:  # name what the pickle wanted to import instead of torch's long advice
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
            except Exception:
                unsafe = []
            if unsafe:
                reason = f'it contains arbitrary Python objects: {", ".join(unsafe)}'
        raise PublishError(
            f'cannot read {path!r} with torch.load(weights_only=True) ({reason}). Only checkpoints of tensors '
            'and plain containers are accepted; re-save the state dict with torch.save(model.state_dict(), PATH) '
            'or safetensors.'
        ) from e
    if not isinstance(checkpoint, dict):
        raise PublishError(f'{path!r} holds a {type(checkpoint).__name__}, not a checkpoint dict or state dict.')

    arch = checkpoint.get('arch') if isinstance(checkpoint.get('arch'), str) else None
    ema_key = next((k for k in ('state_dict_ema', 'model_ema') if isinstance(checkpoint.get(k), dict)), None)
    if use_ema:
        if ema_key is None:
            raise PublishError(
                f'--use-ema was given but {path!r} has no EMA weights (state_dict_ema); '
                'drop --use-ema or pass a timm train.py checkpoint saved with --model-ema.'
            )
        return Checkpoint(
            file, checkpoint[ema_key], f'the EMA weights ({ema_key}) of a timm train.py checkpoint', arch, sha256
        )

    if isinstance(checkpoint.get('state_dict'), dict):
        if 'optimizer' in checkpoint and 'best_prec1' in checkpoint:
            kind = "a checkpoint of the authors' main.py"
        elif 'args' in checkpoint or 'version' in checkpoint:
            kind = 'a timm train.py checkpoint'
        else:
            kind = 'a checkpoint'
        epoch = checkpoint.get('epoch')
        if isinstance(epoch, int):
            kind += f' (epoch {epoch})'
        return Checkpoint(file, checkpoint['state_dict'], kind, arch, sha256)
    if isinstance(checkpoint.get('model'), dict):
        return Checkpoint(file, checkpoint['model'], 'a checkpoint (model entry)', arch, sha256)
    return Checkpoint(file, checkpoint, 'a plain state dict', arch, sha256)


def _epsanet_models() -> List[str]:
    import timm

    import timm_epsanet  # noqa: F401  (registers the models)

    return timm.list_models(module='epsanet')


def _check_model_name(model_name: str) -> None:
    names = _epsanet_models()
    if model_name not in names:
        raise PublishError(f'unknown model {model_name!r}; --model must be one of: {", ".join(names)}.')


def _head_and_stem(state_dict: Dict[str, Any]) -> Dict[str, int]:
    """num_classes / in_chans the checkpoint was trained with, so fine-tuned checkpoints load strictly too."""
    from timm.models import clean_state_dict

    cleaned = clean_state_dict(state_dict)
    kwargs = {}
    fc = cleaned.get('fc.weight')
    if getattr(fc, 'ndim', 0) == 2:
        kwargs['num_classes'] = int(fc.shape[0])
    stem = cleaned.get('conv1.weight')
    if getattr(stem, 'ndim', 0) == 4:
        kwargs['in_chans'] = int(stem.shape[1])
    return kwargs


def convert_checkpoint(checkpoint: Checkpoint, model_name: str) -> Tuple[Dict[str, Any], Dict[str, int]]:
    """Convert the checkpoint's weights for ``model_name`` with the package's ``checkpoint_filter_fn``.

    Returns:
        The converted state dict, and the ``create_model`` kwargs (num_classes, in_chans) it needs.

    Raises:
        PublishError: Unknown model, or weights of another architecture.
    """
    import timm

    from timm_epsanet import checkpoint_filter_fn

    _check_model_name(model_name)
    model_kwargs = _head_and_stem(checkpoint.state_dict)
    template = timm.create_model(model_name, device='meta', **model_kwargs)
    try:
        state_dict = checkpoint_filter_fn(checkpoint.state_dict, template)
    except ValueError as e:
        hint = ''
        if checkpoint.arch and checkpoint.arch != model_name and checkpoint.arch in _epsanet_models():
            hint = f' The checkpoint says arch={checkpoint.arch!r}: try --model {checkpoint.arch}.'
        raise PublishError(f'{checkpoint.path}: {_one_line(e)}{hint}') from e
    return state_dict, model_kwargs


def build_source_model(model_name: str, state_dict: Dict[str, Any], **model_kwargs):
    """``timm.create_model(model_name)`` with ``state_dict`` loaded strictly, in eval mode."""
    import timm

    model = timm.create_model(model_name, **model_kwargs)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise PublishError(f'the converted weights do not load strictly into {model_name}: {_one_line(e)}') from e
    return model.eval()


def model_stats(model) -> Dict[str, Any]:
    """Params, GMACs and activations (conv / linear outputs, as timm's model cards count them) at the cfg size.

    Counted on a meta-device copy, so nothing is computed.
    """
    import timm
    import torch

    from .zoo import count_macs

    cfg = model.pretrained_cfg
    input_size = tuple(cfg['input_size'])
    meta = timm.create_model(
        cfg['architecture'], device='meta', num_classes=model.num_classes, in_chans=input_size[0]
    ).eval()
    activations = 0

    def count(module, inputs, output):
        nonlocal activations
        activations += output.numel()

    hooks = [
        m.register_forward_hook(count) for m in meta.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    try:
        macs = count_macs(meta, input_size)  # also runs the forward that the hooks count
    finally:
        for h in hooks:
            h.remove()
    return {
        'params': sum(p.numel() for p in model.parameters()),
        'gmacs': macs / 1e9,
        'activations': activations,
        'image_size': input_size[1:],
    }


def _usage(load_name: str) -> str:
    return f"""The model is not part of timm itself: install the package that registers it first.

```bash
# timm-epsanet from a checkout of its source repository (it was not on PyPI when this card was written;
# once it is, `pip install timm-epsanet` installs the same package); timm and torch come with it
pip install ./timm-epsanet
```

### Image classification
```python
import timm
import timm_epsanet  # registers the EPSANet architectures with timm
import torch
from PIL import Image

model = timm.create_model('{load_name}', pretrained=True).eval()

# preprocessing that matches the weights (resize, center crop, normalization)
data_config = timm.data.resolve_data_config({{}}, model=model)
transform = timm.data.create_transform(**data_config, is_training=False)

img = Image.open('image.jpg').convert('RGB')
with torch.no_grad():
    probs = model(transform(img).unsqueeze(0)).softmax(dim=-1)
top5_prob, top5_idx = probs.topk(5)
```

### Feature maps (backbone)
```python
backbone = timm.create_model('{load_name}', pretrained=True, features_only=True).eval()
print(backbone.feature_info.channels())  # [64, 256, 512, 1024, 2048]
features = backbone(torch.randn(1, 3, 224, 224))  # strides 2, 4, 8, 16, 32
```

### Fine-tuning
```python
model = timm.create_model('{load_name}', pretrained=True, num_classes=10)  # new classifier
```
"""


def make_model_card(
    model,
    *,
    tag: str,
    repo_id: str,
    checkpoint: Checkpoint,
    results: Optional[Results] = None,
) -> str:
    """The model card (``README.md``) with Hugging Face metadata, written by timm's ``generate_readme``."""
    from timm.models._hub import generate_readme  # not re-exported by timm.models

    import timm_epsanet

    cfg = model.pretrained_cfg
    name = cfg['architecture']
    stats = model_stats(model)
    results = results or Results()
    height, width = stats['image_size']
    details: Dict[str, Any] = {
        'Model Type': 'Image classification / feature backbone',
        'Model Stats': {
            'Params (M)': f'{stats["params"] / 1e6:.2f}',
            'GMACs': f'{stats["gmacs"]:.2f}',
            'Activations (M)': f'{stats["activations"] / 1e6:.2f}',
            'Image size': f'{height} x {width}',
        },
        'Papers': {cfg['paper_name']: 'https://arxiv.org/abs/2105.14447'},
        'Dataset': results.dataset,
        'Original': cfg['origin_url'],
    }
    if results.top1 is not None or results.top5 is not None:
        measured = {}
        if results.top1 is not None:
            measured['Top-1 (%)'] = f'{results.top1:.2f}'
        if results.top5 is not None:
            measured['Top-5 (%)'] = f'{results.top5:.2f}'
        details[f'Results ({results.dataset}, {height}x{width}, single crop)'] = measured
    details['Weights'] = (
        f'converted from {checkpoint.kind}, file `{checkpoint.path.name}` (sha256 {checkpoint.sha256}), by '
        f'timm-epsanet {timm_epsanet.__version__} `hub_upload.py`. The EPSANet authors released no weights; '
        'these were trained by the uploader.'
    )
    description = (
        f'{name} ({tag}): EPSANet, a ResNet whose bottleneck 3x3 convolution is replaced by a Pyramid Squeeze '
        'Attention (PSA) module, packaged for timm by timm-epsanet. '
    )
    if name.endswith('_large'):
        description += (
            'The "Large" variant is a reconstruction from the paper\'s published parameter and FLOP counts; '
            "the authors' code never contained it. "
        )
    card = {
        'tags': ['image-classification', 'timm', 'epsanet'],
        'license': cfg.get('license') or 'apache-2.0',
        'description': description,
        'details': details,
        'usage': _usage(f'hf-hub:{repo_id}'),
        'citation': [CITATION],
    }
    return generate_readme(card, f'{name}.{tag}', task_name='image-classification')


def write_folder(model, out_dir: Path, *, tag: str, model_card: str) -> Path:
    """Write ``model.safetensors``, ``config.json`` and ``README.md`` for ``model`` into ``out_dir``.

    Raises:
        PublishError: ``out_dir`` holds other files, which an upload would publish too.
    """
    from timm.models import save_for_hf

    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise PublishError(f'--output-dir {str(out_dir)!r} is a file; pass a folder path.')
        extra = sorted(p.name for p in out_dir.iterdir() if p.name not in FOLDER_FILES)
        if extra:
            raise PublishError(
                f'--output-dir {str(out_dir)!r} already holds other files ({", ".join(extra)}), which would be '
                'uploaded too; use an empty or new folder.'
            )
    # safetensors only: a pickle in a public repository is something every downloader has to trust.
    save_for_hf(model, out_dir, model_config={'pretrained_cfg': {'tag': tag}}, safe_serialization=True)
    (out_dir / 'README.md').write_text(model_card, encoding='utf-8')
    return out_dir


def _probe_input(model) -> 'Any':
    import torch

    in_chans = model.pretrained_cfg['input_size'][0]
    generator = torch.Generator().manual_seed(0)
    return torch.randn((2, in_chans, 96, 96), generator=generator)


def verify_folder(out_dir: Path, model) -> None:
    """Reload ``out_dir`` through timm's ``local-dir:`` loader and require bit-identical weights and logits.

    Raises:
        PublishError: The reloaded model differs from ``model`` in any tensor or logit.
    """
    import timm
    import torch

    out_dir = Path(out_dir)
    try:
        reloaded = timm.create_model(f'local-dir:{out_dir.resolve()}', pretrained=True).eval()
    except Exception as e:
        raise PublishError(f'verification failed: {out_dir} does not load back with timm ({_one_line(e)}).') from e
    source = model.state_dict()
    loaded = reloaded.state_dict()
    differing = sorted(k for k in source if k not in loaded or not torch.equal(source[k], loaded[k]))
    if differing or set(loaded) != set(source):
        shown = ', '.join(differing[:5]) or 'key sets differ'
        raise PublishError(
            f"verification failed: the folder's weights differ from the source ({shown}); not published."
        )
    x = _probe_input(model)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        expected, got = model(x), reloaded(x)
    model.train(was_training)
    if not torch.equal(expected, got):
        raise PublishError(
            f'verification failed: logits of the reloaded folder differ from the source '
            f'(max abs diff {(expected - got).abs().max().item():.3g}); not published.'
        )


def push_folder(
    out_dir: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: str = 'Add EPSANet weights',
) -> str:
    """Create ``repo_id`` if needed and upload ``out_dir`` to it; returns the commit URL.

    The token comes from huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``); it is never printed.

    Raises:
        PublishError: The Hub cannot be reached or refuses the upload.
    """
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise PublishError('HF_HUB_OFFLINE is set, so nothing can be pushed; unset it, or drop --repo-id.')
    from timm_epsanet import __version__

    api = HfApi(library_name='timm-epsanet', library_version=__version__)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_url.repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_url.repo_id,
            folder_path=str(out_dir),
            revision=revision,
            commit_message=commit_message,
            allow_patterns=list(FOLDER_FILES),
        )
    except Exception as e:
        raise PublishError(
            f'could not push to {api.endpoint}/{repo_id}: {_one_line(e).split(". ")[0]}. Check the network, the '
            'repository id, and that your token (HF_TOKEN or `hf auth login`) may write to it; '
            f'the verified folder {out_dir} is ready to retry.'
        ) from e
    return commit.commit_url


def publish(
    model_name: str,
    checkpoint_path: str,
    *,
    output_dir: Optional[str] = None,
    repo_id: Optional[str] = None,
    tag: str = 'in1k',
    use_ema: bool = False,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: str = 'Add EPSANet weights',
    results: Optional[Results] = None,
    log=print,
) -> Path:
    """Run the whole pipeline: load, convert, strict load, write, verify, and push when ``repo_id`` is given.

    Returns:
        The verified folder.
    """
    from timm_epsanet import HUB_ORGANIZATION

    _check_model_name(model_name)
    if repo_id:  # a bad id would otherwise only surface after the whole conversion
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(repo_id)
        except ValueError as e:
            raise PublishError(
                f'--repo-id {repo_id!r} is not a Hub repository id ({_one_line(e)}); use ORG/NAME.'
            ) from e
    default_repo = f'{HUB_ORGANIZATION}/{model_name}.{tag}'
    out_dir = Path(output_dir or f'{model_name}.{tag}')

    checkpoint = load_checkpoint(checkpoint_path, use_ema=use_ema)
    log(f'loaded {checkpoint.kind} from {checkpoint.path}')
    state_dict, model_kwargs = convert_checkpoint(checkpoint, model_name)
    model = build_source_model(model_name, state_dict, **model_kwargs)
    log(f'converted and loaded strictly into {model_name} ({len(state_dict)} tensors)')
    card = make_model_card(model, tag=tag, repo_id=repo_id or default_repo, checkpoint=checkpoint, results=results)
    write_folder(model, out_dir, tag=tag, model_card=card)
    log(f'wrote {", ".join(FOLDER_FILES)} to {out_dir}')
    verify_folder(out_dir, model)
    log(f'verified: local-dir:{out_dir} reloads with bit-identical weights and logits')

    if not repo_id:
        log('no --repo-id given, nothing was uploaded')
        return out_dir
    if repo_id != default_repo:
        log(
            f'note: timm.create_model("{model_name}", pretrained=True) looks in {default_repo}; weights in '
            f'{repo_id} load with timm.create_model("hf-hub:{repo_id}", pretrained=True)'
        )
    url = push_folder(out_dir, repo_id, private=private, revision=revision, commit_message=commit_message)
    log(f'pushed to {repo_id}: {url}')
    return out_dir


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    # prog: the name the usage line shows; by default the running script's (hub_upload.py, epsanet-hub-upload)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Convert an EPSANet checkpoint (authors' main.py, timm train.py, plain state dict or safetensors) "
            'into a timm Hugging Face Hub folder (model.safetensors, config.json, README.md), verify it reloads '
            'bit-identically, and push it when --repo-id is given. Without --repo-id nothing touches the network.'
        ),
    )
    parser.add_argument('--model', required=True, help='EPSANet model name, e.g. epsanet50')
    parser.add_argument('--checkpoint', required=True, help='checkpoint file (.pth, .pth.tar, .bin, .safetensors)')
    parser.add_argument('--output-dir', help='folder to write (default: ./MODEL.TAG); must be new, empty or ours')
    parser.add_argument('--repo-id', help='Hub repository ORG/NAME to push to (default: do not push)')
    parser.add_argument('--tag', default='in1k', help='pretrained tag recorded in config.json (default: in1k)')
    parser.add_argument('--use-ema', action='store_true', help='publish the EMA weights of a timm train.py checkpoint')
    parser.add_argument('--private', action='store_true', help='create the repository as private')
    parser.add_argument('--revision', help='branch to push to (created if missing; default: main)')
    parser.add_argument(
        '--commit-message', default='Add EPSANet weights', help='commit message of the upload (default: %(default)s)'
    )
    parser.add_argument('--top1', type=float, help='measured top-1 accuracy (%%) for the model card')
    parser.add_argument('--top5', type=float, help='measured top-5 accuracy (%%) for the model card')
    parser.add_argument(
        '--dataset', default='imagenet-1k', help='dataset the weights were trained/evaluated on (default: %(default)s)'
    )
    return parser


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    try:
        publish(
            args.model,
            args.checkpoint,
            output_dir=args.output_dir,
            repo_id=args.repo_id,
            tag=args.tag,
            use_ema=args.use_ema,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            results=Results(args.top1, args.top5, args.dataset),
        )
    except PublishError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('error: interrupted', file=sys.stderr)
        return 130
    except Exception as e:  # anything unforeseen still gets one line, not a traceback
        print(f'error: {type(e).__name__}: {_one_line(e)} (unexpected; please report it)', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main(prog='python -m timm_epsanet.publish'))
