"""Publish EPSANet weights to the Hugging Face Hub in timm's format (the logic behind ``hub_upload.py``).

The pipeline, one function per step:

1. :func:`load_checkpoint` reads a checkpoint written by the authors' ``main.py``, by timm's ``train.py``
   (``state_dict`` / ``state_dict_ema``), a plain state dict, or a ``.safetensors`` file, without
   unpickling arbitrary objects, and refuses weights that would not load as they are
   (:mod:`timm_epsanet.checkpoint_io`).
2. :func:`convert_checkpoint` turns it into a state dict with the package's ``checkpoint_filter_fn``.
3. :func:`build_source_model` strictly loads that state dict into ``timm.create_model(model)``.
4. :func:`write_folder` writes ``model.safetensors``, ``config.json`` (timm's ``save_for_hf``) and a
   model card ``README.md`` into a fresh staging folder beside the output folder.
5. :func:`verify_folder` checks the staged files (finite weights, config and card parse) and reloads
   them with ``timm.create_model("local-dir:DIR", pretrained=True)``, requiring bit-identical weights and
   logits; it returns the files' sha256. Only then is the staging folder renamed into place.
6. :func:`push_folder` uploads those files, after checking that their bytes still have the verified
   sha256, with ``huggingface_hub`` (only when a repo id is given).

The output folder is locked for the whole run, so two runs never interleave; a folder holding anything
but a previous export of this tool is refused, never overwritten. Every failure a user can cause raises
:class:`PublishError` (or, for a write that fails, ``OSError``) with a one-line message; the CLI prints
it and exits non-zero.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .checkpoint_io import (
    EMA_KEYS,
    CheckpointError,
    check_weights,
    os_error_reason,
    read_checkpoint,
    select_weights,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the lock falls back to an exclusive create
    fcntl = None

__all__ = [
    'PublishError',
    'Results',
    'load_checkpoint',
    'convert_checkpoint',
    'build_source_model',
    'model_stats',
    'make_model_card',
    'write_folder',
    'is_previous_export',
    'verify_folder',
    'push_folder',
    'publish',
    'main',
]

# What the folder holds; nothing else is ever written, uploaded or replaced.
FOLDER_FILES = ('model.safetensors', 'config.json', 'README.md')
# config.json entry that marks a folder as written by this tool, so a rerun may replace it.
EXPORT_MARKER = 'timm_epsanet_export'
TOOL = 'hub_upload.py'
# Tags and dataset names end up in repository ids, folder names and the card's YAML header.
_HUB_NAME = re.compile(r'[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*')

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


def _check_hub_name(value: str, option: str, example: str, limit: int = 64) -> None:
    if not _HUB_NAME.fullmatch(value) or len(value) > limit:
        raise PublishError(
            f'{option} {value!r} is not a Hub-safe name: use letters, digits and single . _ - between them '
            f'(no spaces, slashes or newlines, at most {limit} characters), e.g. {example}.'
        )


def check_card_inputs(tag: str, results: Results) -> None:
    """Refuse a tag, dataset or accuracy that the folder name, repository id or model card cannot hold.

    Raises:
        PublishError: ``tag`` / ``dataset`` is not a Hub-safe name, or an accuracy is not a finite
            percentage (or top-5 is below top-1).
    """
    _check_hub_name(tag, '--tag', 'in1k or ft_in1k')
    _check_hub_name(results.dataset, '--dataset', 'imagenet-1k', limit=96)
    for option, value in (('--top1', results.top1), ('--top5', results.top5)):
        if value is not None and not (math.isfinite(value) and 0 <= value <= 100):
            raise PublishError(f'{option} {value} is not an accuracy in percent; give a number from 0 to 100.')
    if results.top1 is not None and results.top5 is not None and results.top5 < results.top1:
        raise PublishError(
            f'--top5 {results.top5} is below --top1 {results.top1}; top-5 accuracy is never lower than top-1.'
        )


def load_checkpoint(path: str, use_ema: bool = False) -> Checkpoint:
    """Read a checkpoint file safely and pick the weights to publish.

    Pickled checkpoints are read with ``torch.load(weights_only=True)``; only ``argparse.Namespace`` (the
    ``args`` entry of timm train.py checkpoints) is allowed beyond tensors and containers.

    Args:
        path: Checkpoint file (``.pth``, ``.pth.tar``, ``.bin``, ``.safetensors``, ...).
        use_ema: Take the EMA weights (``state_dict_ema`` / ``model_ema``) of a timm train.py checkpoint.

    Raises:
        PublishError: The file is missing, unreadable or unsafe; it has no EMA weights when they are asked
            for, or only EMA weights when they are not; or its weights are ambiguous, complex or not finite.
    """
    file = Path(path)
    try:
        raw = read_checkpoint(path)
        if use_ema and not (isinstance(raw, dict) and any(isinstance(raw.get(k), dict) for k in EMA_KEYS)):
            raise PublishError(
                f'--use-ema was given but {path!r} has no EMA weights (state_dict_ema); '
                'drop --use-ema or pass a timm train.py checkpoint saved with --model-ema.'
            )
        state_dict, entry = select_weights(raw, path, use_ema=use_ema)
        check_weights(state_dict, path)
    except CheckpointError as e:
        raise PublishError(str(e)) from e
    sha256 = _sha256(file)

    arch = raw.get('arch') if isinstance(raw.get('arch'), str) else None
    if entry in EMA_KEYS:
        kind = f'the EMA weights ({entry}) of a timm train.py checkpoint'
    elif entry == 'state_dict':
        if 'optimizer' in raw and 'best_prec1' in raw:
            kind = "a checkpoint of the authors' main.py"
        elif 'args' in raw or 'version' in raw:
            kind = 'a timm train.py checkpoint'
        else:
            kind = 'a checkpoint'
        epoch = raw.get('epoch')
        if isinstance(epoch, int):
            kind += f' (epoch {epoch})'
    elif entry == 'model':
        kind = 'a checkpoint (model entry)'
    else:
        kind = 'a safetensors state dict' if file.name.endswith('.safetensors') else 'a plain state dict'
    return Checkpoint(file, state_dict, kind, arch, sha256)


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


def _in_chans(model) -> int:
    """Input channels of the model's stem (a fine-tuned checkpoint may have 1 or 4, whatever the cfg says)."""
    return model.get_submodule(model.pretrained_cfg['first_conv']).in_channels


def model_stats(model) -> Dict[str, Any]:
    """Params, GMACs and activations (conv / linear outputs, as timm's model cards count them) at the cfg size.

    Counted on a meta-device copy, so nothing is computed.
    """
    import timm
    import torch

    from .zoo import count_macs

    cfg = model.pretrained_cfg
    in_chans = _in_chans(model)
    input_size = (in_chans, *cfg['input_size'][1:])
    meta = timm.create_model(cfg['architecture'], device='meta', num_classes=model.num_classes, in_chans=in_chans)
    meta.eval()
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


def _code_span(text: str) -> str:
    """``text`` as one Markdown code span: shown literally, control characters spelled out (``\\n``)."""
    shown = ''.join(c if c.isprintable() else c.encode('unicode_escape').decode('ascii') for c in text)
    fence = '`' * (max((len(run) for run in re.findall('`+', shown)), default=0) + 1)
    if len(fence) > 1 or shown.startswith(('`', ' ')) or shown.endswith(('`', ' ')):
        return f'{fence} {shown} {fence}'
    return f'{fence}{shown}{fence}'


def _yaml_header(metadata: Dict[str, Any]) -> str:
    """The card's metadata block, written by PyYAML and read back to prove that it says what was meant."""
    import yaml

    text = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, default_flow_style=False)
    if yaml.safe_load(text) != metadata:  # pragma: no cover - safe_dump round-trips plain str / list data
        raise PublishError('the model card metadata does not survive a YAML round trip; please report it.')
    return f'---\n{text}---\n'


def make_model_card(
    model,
    *,
    tag: str,
    repo_id: str,
    checkpoint: Checkpoint,
    results: Optional[Results] = None,
) -> str:
    """The model card (``README.md``): a YAML metadata header, and a body written by timm's ``generate_readme``."""
    from timm.models._hub import generate_readme  # not re-exported by timm.models

    import timm_epsanet

    cfg = model.pretrained_cfg
    name = cfg['architecture']
    stats = model_stats(model)
    results = results or Results()
    check_card_inputs(tag, results)
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
        f'converted from {checkpoint.kind}, file {_code_span(checkpoint.path.name)} (sha256 {checkpoint.sha256}), '
        f'by timm-epsanet {timm_epsanet.__version__} `{TOOL}`. The EPSANet authors released no weights; '
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
    tags = ['image-classification', 'timm', 'epsanet']
    license_id = cfg.get('license') or 'apache-2.0'
    card = {
        'tags': tags,
        'license': license_id,
        'description': description,
        'details': details,
        'usage': _usage(f'hf-hub:{repo_id}'),
        'citation': [CITATION],
    }
    text = generate_readme(card, f'{name}.{tag}', task_name='image-classification')
    # timm formats its metadata header by hand; ours is written by a YAML library, the body is timm's.
    body = text.split('---\n', 2)[2]
    metadata = {
        'tags': tags,
        'pipeline_tag': 'image-classification',
        'library_name': 'timm',
        'license': license_id,
        'datasets': [results.dataset],
    }
    return _yaml_header(metadata) + body


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. folders on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems without fsync on directories
        pass
    finally:
        os.close(fd)


def _as_os_error(error: Exception, path: Path) -> Exception:
    """safetensors reports I/O failures as its own error type; give them back their errno (disk full, ...)."""
    code = re.search(r'Os \{ code: (\d+)', str(error))
    if code:
        number = int(code[1])
        return OSError(number, os.strerror(number), str(path))
    return error


def write_folder(model, out_dir: Path, *, tag: str, model_card: str) -> Path:
    """Write ``model.safetensors``, ``config.json`` and ``README.md`` for ``model`` into ``out_dir``.

    ``out_dir`` must be new or empty (:func:`publish` passes a fresh staging folder). All three files get
    the permissions of a newly created file (0666 less the umask) and are flushed to disk.

    Raises:
        PublishError: ``out_dir`` is not empty.
        OSError: A write failed (disk full, permission denied, ...).
    """
    from timm.models import save_for_hf

    import timm_epsanet

    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise PublishError(f'{out_dir} is not empty; write_folder writes into a new or empty folder only.')
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = {'tool': TOOL, 'version': timm_epsanet.__version__}
    try:
        # safetensors only: a pickle in a public repository is something every downloader has to trust.
        save_for_hf(
            model,
            out_dir,
            model_config={'pretrained_cfg': {'tag': tag}, EXPORT_MARKER: marker},
            safe_serialization=True,
        )
    except OSError:
        raise
    except Exception as e:
        raise _as_os_error(e, out_dir / 'model.safetensors') from e
    (out_dir / 'README.md').write_text(model_card, encoding='utf-8')
    mode = 0o666 & ~_umask()
    for name in FOLDER_FILES:
        os.chmod(out_dir / name, mode)
        _fsync(out_dir / name)
    return out_dir


def is_previous_export(folder: Path) -> bool:
    """Whether ``folder`` holds exactly a folder written by this tool (its config.json carries the marker)."""
    folder = Path(folder)
    try:
        entries = {p.name: p for p in folder.iterdir()}
        if set(entries) != set(FOLDER_FILES):
            return False
        if any(p.is_symlink() or not p.is_file() for p in entries.values()):
            return False
        config = json.loads(entries['config.json'].read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get(EXPORT_MARKER) or {}).get('tool') == TOOL


def _check_output_dir(out_dir: Path) -> None:
    """Refuse an output folder whose contents this tool did not write: it replaces the folder as a whole."""
    where = f'--output-dir {str(out_dir)!r}'
    if out_dir.is_symlink():
        raise PublishError(
            f'{where} is a symbolic link; hub_upload.py replaces the folder and never writes through links: '
            'pass the real folder.'
        )
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise PublishError(f'{where} is a file; pass a folder path.')
    entries = sorted(out_dir.iterdir())
    if not entries:
        return
    extra = [p.name for p in entries if p.name not in FOLDER_FILES]
    if extra:
        raise PublishError(
            f'{where} already holds files hub_upload.py did not write ({", ".join(extra)}); use an empty or new folder.'
        )
    links = [p.name for p in entries if p.is_symlink() or not p.is_file()]
    if links:
        raise PublishError(
            f'{where}: {", ".join(links)} is a symbolic link or not a regular file; hub_upload.py never writes '
            'through links or replaces what it did not write: use an empty or new folder.'
        )
    if not is_previous_export(out_dir):
        raise PublishError(
            f'{where} holds {", ".join(p.name for p in entries)} not written by hub_upload.py (config.json has no '
            f'{EXPORT_MARKER} entry); move them away or use an empty or new folder.'
        )


class _FolderLock:
    """An exclusive lock on ``.NAME.lock`` beside the output folder, held from the first check to the push.

    A second run on the same folder is refused at once. The lock is ``flock``-based, so a killed run never
    leaves a stale lock behind; the lock file is removed when the run ends.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.path = out_dir.parent / f'.{out_dir.name}.lock'
        self.fd: Optional[int] = None

    def _busy(self) -> PublishError:
        return PublishError(
            f'--output-dir {str(self.out_dir)!r} is in use by another hub_upload.py run (lock {self.path}); '
            'wait for it to finish, or use another folder.'
        )

    def __enter__(self) -> '_FolderLock':
        flags = os.O_RDWR | os.O_CREAT | getattr(os, 'O_NOFOLLOW', 0)
        if fcntl is None:  # pragma: no cover - Windows
            try:
                self.fd = os.open(self.path, flags | os.O_EXCL, 0o644)
            except FileExistsError:
                raise self._busy() from None
            return self
        while True:
            fd = os.open(self.path, flags, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy() from None
            # The previous holder may have removed the file between our open and lock: lock the current one.
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                current = False
            if current:
                self.fd = fd
                return self
            os.close(fd)

    def __exit__(self, *exc) -> None:
        if fcntl is None:  # pragma: no cover - Windows removes no open file
            os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still locked, so no one can lock the file that is going away
        if fcntl is not None:
            os.close(self.fd)


@contextlib.contextmanager
def _staging_dir(out_dir: Path) -> Iterator[Path]:
    """A fresh, private folder beside ``out_dir`` (same file system, so it can be renamed into place)."""
    staging = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.staging-', dir=out_dir.parent))
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _replace_folder(staging: Path, out_dir: Path) -> None:
    """Put the verified ``staging`` folder at ``out_dir`` by renames, never by rewriting files in place.

    At every moment ``out_dir`` is the complete old folder or the complete new one (for an instant, absent).
    """
    os.chmod(staging, 0o777 & ~_umask())
    if not os.path.lexists(out_dir):
        os.rename(staging, out_dir)
    else:
        old = out_dir.parent / f'.{out_dir.name}.old-{secrets.token_hex(4)}'
        os.rename(out_dir, old)
        try:
            os.rename(staging, out_dir)
        except BaseException:
            os.rename(old, out_dir)
            raise
        for name in FOLDER_FILES:  # only what this tool wrote (checked before the run) is deleted
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old / name)
        with contextlib.suppress(OSError):  # anything added meanwhile by someone else stays where it is
            os.rmdir(old)
    _fsync(out_dir.parent)


def folder_manifest(folder: Path) -> Dict[str, str]:
    """sha256 of each file of the folder, which must hold exactly :data:`FOLDER_FILES`, as regular files."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir())
    if names != sorted(FOLDER_FILES):
        raise PublishError(f'{folder} holds {", ".join(names) or "nothing"}, not {", ".join(FOLDER_FILES)}.')
    for name in FOLDER_FILES:
        if (folder / name).is_symlink() or not (folder / name).is_file():
            raise PublishError(f'{folder / name} is not a regular file.')
    return {name: _sha256(folder / name) for name in FOLDER_FILES}


def _same_bits(a, b) -> bool:
    """Bit-identical tensors (NaN-aware: equal NaNs compare equal, unlike ``torch.equal``)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_complex or a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _probe_input(model) -> 'Any':
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randn((2, _in_chans(model), 96, 96), generator=generator)


def verify_folder(out_dir: Path, model) -> Dict[str, str]:
    """Check the folder's files and reload them with timm; returns their sha256 (what may be pushed).

    Requires: exactly the three files, as regular files; finite weights; config.json written by this tool;
    a model card whose YAML header parses; ``timm.create_model("local-dir:...", pretrained=True)`` giving
    bit-identical weights and logits; and no file changed while all this was checked.

    Raises:
        PublishError: Any of these does not hold.
    """
    import timm
    import torch
    import yaml
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    manifest = folder_manifest(out_dir)
    try:
        tensors = load_file(str(out_dir / 'model.safetensors'))
    except Exception as e:
        raise PublishError(f'verification failed: model.safetensors does not load ({_one_line(e)}).') from e
    non_finite = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(v.isfinite().all()))
    if non_finite:
        raise PublishError(f'verification failed: weights are not finite in {", ".join(non_finite[:5])}.')
    try:
        config = json.loads((out_dir / 'config.json').read_text(encoding='utf-8'))
        card = (out_dir / 'README.md').read_text(encoding='utf-8')
        metadata = yaml.safe_load(card.split('---\n', 2)[1]) if card.startswith('---\n') else None
    except (ValueError, yaml.YAMLError) as e:
        raise PublishError(f'verification failed: config.json or README.md does not parse ({_one_line(e)}).') from e
    if (config.get(EXPORT_MARKER) or {}).get('tool') != TOOL:
        raise PublishError(f'verification failed: config.json lacks the {EXPORT_MARKER} entry.')
    if not isinstance(metadata, dict) or metadata.get('library_name') != 'timm':
        raise PublishError('verification failed: README.md has no YAML metadata header for timm.')
    try:
        reloaded = timm.create_model(f'local-dir:{out_dir.resolve()}', pretrained=True).eval()
    except Exception as e:
        raise PublishError(f'verification failed: {out_dir} does not load back with timm ({_one_line(e)}).') from e
    source = model.state_dict()
    loaded = reloaded.state_dict()
    differing = sorted(k for k in source if k not in loaded or not _same_bits(source[k], loaded[k]))
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
    if not _same_bits(expected, got):
        raise PublishError(
            f'verification failed: logits of the reloaded folder differ from the source '
            f'(max abs diff {(expected - got).abs().max().item():.3g}); not published.'
        )
    if folder_manifest(out_dir) != manifest:
        raise PublishError(f'verification failed: files in {out_dir} changed while they were verified.')
    return manifest


def _check_can_push(repo_id: str) -> None:
    """Everything about a push that can be checked before converting: the id, offline mode, a token."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as e:
        raise PublishError(f'--repo-id {repo_id!r} is not a Hub repository id ({_one_line(e)}); use ORG/NAME.') from e
    if constants.HF_HUB_OFFLINE:
        raise PublishError('HF_HUB_OFFLINE is set, so nothing can be pushed; unset it, or drop --repo-id.')
    if not get_token():
        raise PublishError(
            'no Hugging Face token found, so nothing can be pushed; set HF_TOKEN or run `hf auth login`, '
            'or drop --repo-id.'
        )


def push_folder(
    out_dir: Path,
    repo_id: str,
    *,
    manifest: Optional[Dict[str, str]] = None,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: str = 'Add EPSANet weights',
) -> str:
    """Create ``repo_id`` if needed and upload the folder's three files to it; returns the commit URL.

    The files are read once; with ``manifest`` (from :func:`verify_folder`) their sha256 must match it, and
    those very bytes are uploaded, so nothing that was not verified can reach the Hub. The token comes from
    huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``); it is never printed.

    Raises:
        PublishError: The folder changed since it was verified, or the Hub cannot be reached or refuses.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise PublishError('HF_HUB_OFFLINE is set, so nothing can be pushed; unset it, or drop --repo-id.')
    from timm_epsanet import __version__

    out_dir = Path(out_dir)
    contents = {}
    for name in FOLDER_FILES:
        path = out_dir / name
        if path.is_symlink() or not path.is_file():
            raise PublishError(f'{path} is missing or not a regular file; nothing was pushed.')
        try:
            contents[name] = path.read_bytes()
        except OSError as e:
            raise PublishError(f'cannot read {path}: {os_error_reason(e)}; nothing was pushed.') from e
    if manifest is not None:
        changed = [n for n in FOLDER_FILES if hashlib.sha256(contents[n]).hexdigest() != manifest.get(n)]
        if changed:
            raise PublishError(
                f'{", ".join(changed)} in {out_dir} changed since it was verified; nothing was pushed. '
                'Run hub_upload.py again.'
            )
    api = HfApi(library_name='timm-epsanet', library_version=__version__)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_url.repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(
            repo_id=repo_url.repo_id,
            operations=[CommitOperationAdd(path_in_repo=n, path_or_fileobj=contents[n]) for n in FOLDER_FILES],
            commit_message=commit_message,
            revision=revision,
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
    """Run the whole pipeline: load, convert, strict load, stage, verify, rename into place, push.

    Every input is checked before anything is converted (and, with ``repo_id``, offline mode and the token).
    A failure leaves ``output_dir`` as it was; only the verified bytes are pushed.

    Returns:
        The verified folder.
    """
    from timm_epsanet import HUB_ORGANIZATION

    results = results or Results()
    _check_model_name(model_name)
    check_card_inputs(tag, results)
    if repo_id:  # a bad id, offline mode or a missing token would otherwise surface after the conversion
        _check_can_push(repo_id)
    default_repo = f'{HUB_ORGANIZATION}/{model_name}.{tag}'
    out_dir = Path(output_dir or f'{model_name}.{tag}')
    if out_dir.name in ('', '.', '..'):
        raise PublishError(f'--output-dir {str(out_dir)!r} must name a folder (e.g. ./{model_name}.{tag}).')
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    with _FolderLock(out_dir):
        _check_output_dir(out_dir)
        # Staging first: a folder that cannot be written (permissions, full disk) fails before the conversion.
        with _staging_dir(out_dir) as staging:
            checkpoint = load_checkpoint(checkpoint_path, use_ema=use_ema)
            log(f'loaded {checkpoint.kind} from {checkpoint.path}')
            state_dict, model_kwargs = convert_checkpoint(checkpoint, model_name)
            model = build_source_model(model_name, state_dict, **model_kwargs)
            log(f'converted and loaded strictly into {model_name} ({len(state_dict)} tensors)')
            repo_for_card = repo_id or default_repo
            card = make_model_card(model, tag=tag, repo_id=repo_for_card, checkpoint=checkpoint, results=results)
            write_folder(model, staging, tag=tag, model_card=card)
            manifest = verify_folder(staging, model)
            _replace_folder(staging, out_dir)
        log(f'verified: {", ".join(FOLDER_FILES)} reload with bit-identical weights and logits; moved to {out_dir}')

        if not repo_id:
            log('no --repo-id given, nothing was uploaded')
            return out_dir
        if repo_id != default_repo:
            log(
                f'note: timm.create_model("{model_name}", pretrained=True) looks in {default_repo}; weights in '
                f'{repo_id} load with timm.create_model("hf-hub:{repo_id}", pretrained=True)'
            )
        url = push_folder(
            out_dir, repo_id, manifest=manifest, private=private, revision=revision, commit_message=commit_message
        )
        log(f'pushed to {repo_id}: {url} (exactly the verified files)')
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
    parser.add_argument(
        '--output-dir', help='folder to write (default: ./MODEL.TAG); must be new, empty or an earlier export'
    )
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
        print(f'error: {_one_line(e)}', file=sys.stderr)
        return 1
    except OSError as e:  # a failed write: said as what it is; the output folder is left as it was
        print(
            f'error: could not write the output folder: {os_error_reason(e)}; --output-dir was left as it was.',
            file=sys.stderr,
        )
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
