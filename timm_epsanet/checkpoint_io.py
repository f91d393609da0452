"""Reading checkpoint files safely, with one clear line for every file that cannot be used.

Shared by ``hub_upload.py`` (:mod:`timm_epsanet.publish`) and by the models' own loading of
``pretrained_cfg_overlay=dict(file=PATH)``. Pickled checkpoints go through
``torch.load(weights_only=True)``, which builds tensors and plain containers only (plus
``argparse.Namespace``, the ``args`` entry of timm train.py checkpoints); anything else is refused
without being constructed, and the error never passes on torch's advice to load unsafely.
Weights are then checked for what would make a loaded model silently differ from the file: keys that
are not strings, two keys that become one name once ``module.`` / ``_orig_mod.`` are removed, complex
tensors (their imaginary part would be dropped) and non-finite values.
"""

import argparse
import contextlib
import errno
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    'CheckpointError',
    'read_checkpoint',
    'select_weights',
    'check_weights',
    'describe_keys',
    'load_weights',
    'os_error_reason',
    'with_file_weights',
]

# Wrapper prefixes timm's clean_state_dict removes (DataParallel / DDP, torch.compile), in any order.
WRAPPER_PREFIXES = ('module.', '_orig_mod.')
EMA_KEYS = ('state_dict_ema', 'model_ema')
# Beyond tensors and containers, the only class a checkpoint may hold: timm train.py's ``args``.
SAFE_GLOBALS = (argparse.Namespace,)
WEIGHT_KEYS = ('state_dict', 'model')
_REASONS = {
    errno.ENOENT: 'no such file or directory',
    errno.EACCES: 'permission denied',
    errno.EPERM: 'permission denied',
    errno.ENOSPC: 'disk full',
    errno.EDQUOT: 'disk full (quota exceeded)',
    errno.ENAMETOOLONG: 'file name too long',
    errno.EROFS: 'read-only file system',
    errno.EISDIR: 'is a directory',
    errno.ENOTDIR: 'a parent is not a directory',
    errno.EIO: 'input/output error',
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, described in one line."""


def os_error_reason(error: OSError) -> str:
    """What an OS error means for the user: "disk full", "permission denied", "file name too long", ..."""
    reason = _REASONS.get(error.errno) or (error.strerror or type(error).__name__).lower()
    return f'{reason} ({error.filename})' if error.filename else reason


def _one_line(text: str) -> str:
    return ' '.join(str(text).split())


def _unpickle_reason(error: Exception, file: Path) -> str:
    """Why torch's safe unpickler refused ``file``, without torch's advice to load it unsafely."""
    allowed = {f'{cls.__module__}.{cls.__qualname__}' for cls in SAFE_GLOBALS}
    names: List[str] = []
    with contextlib.suppress(Exception):  # zip checkpoints: the globals the pickle wants, found without running it
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(file)))
    text = str(error)
    names = [n for n in names if n not in allowed] or re.findall(r'GLOBAL ([\w.]+)', text)
    if names:
        return (
            f'it holds Python objects other than tensors and containers ({", ".join(sorted(set(names)))}), '
            'which can run code when loaded and are never unpickled here. Save the weights alone with '
            'torch.save(model.state_dict(), PATH) or safetensors'
        )
    # What is left once torch's advice (to load unsafely, or to allowlist classes) is taken out.
    sentences = re.split(r'(?<=[.!?])\s+', _one_line(text))
    advice = ('weights_only', 'safe_globals', 'Weights only load failed', 'trusted source', 'documentation')
    detail = ' '.join(s for s in sentences if not any(a in s for a in advice)).strip(' .')
    return f'it is not a PyTorch checkpoint, or was not fully written ({detail or type(error).__name__})'


def read_checkpoint(path: str) -> Any:
    """Read a checkpoint file without running any code it may contain.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: The file is missing, a directory, empty, unreadable, or holds arbitrary objects.
    """
    file = Path(path)
    try:
        if not file.exists():
            raise CheckpointError(f'checkpoint {str(path)!r} does not exist; check the path.')
        if file.is_dir():
            raise CheckpointError(
                f'checkpoint {str(path)!r} is a directory, not a checkpoint file '
                '(a folder written by hub_upload.py loads with timm.create_model("local-dir:PATH")).'
            )
        if not file.is_file():
            raise CheckpointError(f'checkpoint {str(path)!r} is not a regular file.')
        if file.stat().st_size == 0:
            raise CheckpointError(f'checkpoint {str(path)!r} is empty (0 bytes); was it written completely?')
        if file.name.endswith('.safetensors'):
            from safetensors.torch import load_file

            try:
                return load_file(str(file), device='cpu')
            except OSError:
                raise
            except Exception as e:
                raise CheckpointError(
                    f'cannot read {str(path)!r} as safetensors ({_one_line(e)}); '
                    'is the file complete and really safetensors?'
                ) from e
        try:
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                return torch.load(str(file), map_location='cpu', weights_only=True)
        except OSError:
            raise
        except Exception as e:
            raise CheckpointError(
                f'cannot read {str(path)!r} with torch.load(weights_only=True): {_unpickle_reason(e, file)}.'
            ) from e
    except OSError as e:
        raise CheckpointError(f'cannot read checkpoint {str(path)!r}: {os_error_reason(e)}.') from e


def select_weights(checkpoint: Any, path: str, use_ema: Optional[bool] = None) -> Tuple[Dict[Any, Any], str]:
    """The weights in a loaded checkpoint, and the entry they came from ('' for a plain state dict).

    Args:
        checkpoint: What :func:`read_checkpoint` returned.
        path: The file, for messages.
        use_ema: True: the EMA weights (``state_dict_ema`` / ``model_ema``) are required. None: prefer them
            when present, as timm's own file loading does. False: the trained weights (``state_dict`` /
            ``model`` or the plain dict); a checkpoint that holds EMA weights only is refused.

    Raises:
        CheckpointError: Not a dict, or the weights asked for are not there.
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f'{str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint '
            '(a dict of tensors, or a dict with a state_dict entry).'
        )
    ema_key = next((k for k in EMA_KEYS if isinstance(checkpoint.get(k), dict)), None)
    weights_key = next((k for k in WEIGHT_KEYS if isinstance(checkpoint.get(k), dict)), None)
    if use_ema or (use_ema is None and ema_key):
        if ema_key is None:
            raise CheckpointError(f'{str(path)!r} has no EMA weights (state_dict_ema).')
        return checkpoint[ema_key], ema_key
    if weights_key:
        return checkpoint[weights_key], weights_key
    if ema_key and not any(torch.is_tensor(v) for v in checkpoint.values()):
        raise CheckpointError(
            f'{str(path)!r} holds only EMA weights ({ema_key}); ask for them explicitly (hub_upload.py --use-ema).'
        )
    return checkpoint, ''


def _clean_name(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
    return key


def describe_keys(keys: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` keys, comma-separated, and how many there are in all when some are left out."""
    shown = ', '.join(keys[:limit])
    return shown + (f', ... ({len(keys)} in all)' if len(keys) > limit else '')


def check_weights(state_dict: Dict[Any, Any], path: str) -> None:
    """Refuse weights that would load as something other than what the file holds.

    Raises:
        CheckpointError: No tensors, a key that is not a string, two keys that collapse to one name
            after wrapper prefixes are removed, a complex tensor, or a non-finite value (all named).
    """
    where = repr(str(path))
    bad_keys = [repr(k) for k in state_dict if not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(f'{where}: state dict keys must be strings; {describe_keys(bad_keys)} is not a string.')
    tensors = {k: v for k, v in state_dict.items() if torch.is_tensor(v)}
    if not tensors:
        raise CheckpointError(f'{where} holds no tensors; is it a checkpoint of model weights?')
    seen: Dict[str, str] = {}
    for key in tensors:
        name = _clean_name(key)
        if name in seen:
            raise CheckpointError(
                f'{where}: keys {seen[name]!r} and {key!r} both load as the same name {name!r} once '
                'the module. / _orig_mod. prefixes are removed; keep one of them.'
            )
        seen[name] = key
    complex_keys = [k for k, v in tensors.items() if v.is_complex()]
    if complex_keys:
        raise CheckpointError(
            f'{where}: complex tensors ({describe_keys(complex_keys)}) would lose their imaginary part in the model.'
        )
    non_finite = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if non_finite:
        raise CheckpointError(
            f'{where}: weights are not finite (inf or NaN) in {describe_keys(non_finite)}; '
            'the training diverged or the file is damaged.'
        )


def load_weights(path: str, use_ema: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """:func:`read_checkpoint`, :func:`select_weights` and :func:`check_weights` in one call."""
    state_dict, _ = select_weights(read_checkpoint(path), path, use_ema)
    check_weights(state_dict, path)
    return state_dict


def with_file_weights(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Model kwargs in which a ``file=`` weight source is replaced by its safely loaded, checked weights.

    timm would otherwise read the file itself and fail on a missing, empty or odd file with an exception
    that has no message. The pretrained cfg keeps ``file``; the in-memory ``state_dict`` that takes
    precedence over it must be dropped from the model's cfg after building.
    """
    from timm.models._builder import resolve_pretrained_cfg

    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get('pretrained_cfg'),
        pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'),
    )
    if cfg.source in ('hf-hub', 'local-dir') or cfg.state_dict or not cfg.file or cfg.custom_load:
        return kwargs
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {}, state_dict=load_weights(cfg.file))
    return dict(kwargs, pretrained_cfg_overlay=overlay)
