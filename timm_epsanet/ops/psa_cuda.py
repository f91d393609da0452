"""PSA branch convolutions through cuDNN, and a per-shape choice between implementations measured on first use.

A PSA module's branches all read the same input: branch ``i`` convolves it with ``weights[i]`` (odd kernel,
``groups[i]`` groups, no bias), padded so the output stays aligned with the input. cuDNN runs EPSANet's
grouped large-kernel branches far below tensor-core speed, so two cuDNN formulations compete here with the
Triton kernels of ``psa_triton.py``:

* :func:`psa_branch_convs_grouped`: one grouped ``F.conv2d`` per branch, as ``nn.Conv2d`` computes it.
* :func:`psa_branch_convs_densified`: each branch as a dense (``groups=1``) convolution on its weight
  expanded to block-diagonal form, zeros between the groups. More MACs, but dense kernels run at tensor-core
  speed: on an H100 (bf16, channels_last) this was faster forward for every grouped branch of EPSANet-50's
  stages 1-3 (see ``shared/notes/gpu-baseline.md``), slower for the widest grouping at stage 4.

Which one wins depends on the card, dtype, layout and shape, so no threshold decides: :func:`choose` times
each candidate on the first call with a new key (forward, or forward and backward when autograd records),
remembers the fastest for the process, and :func:`choices` exposes the table. Set the environment variable
``TIMM_EPSANET_PSA_FORCE`` (or call :func:`force`) to a candidate's name to bypass the measurement.
"""

import functools
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .common import same_padding

__all__ = [
    'FORCE_ENV',
    'BranchConvsKey',
    'Choice',
    'branch_convs_key',
    'block_diagonal_weight',
    'choices',
    'choose',
    'clear_choices',
    'force',
    'forced_candidate',
    'format_choices',
    'measure',
    'psa_branch_convs_densified',
    'psa_branch_convs_grouped',
]

FORCE_ENV = 'TIMM_EPSANET_PSA_FORCE'


def psa_branch_convs_grouped(
    x: torch.Tensor, weights: Sequence[torch.Tensor], groups: Sequence[int], stride: int, dilation: int
) -> torch.Tensor:
    """All branch convolutions as grouped ``F.conv2d`` calls, concatenated last branch first (the authors' order).

    Args:
        x: Input (B, C, H, W), any memory format.
        weights: One weight (C_out, C / groups[i], k_i, k_i) per branch, k_i odd.
        groups: Groups of each branch.
        stride: Stride of every branch.
        dilation: Dilation of every branch.

    Returns:
        (B, N * C_out, H', W'): branch N-1 first, branch 0 last.
    """
    feats: List[torch.Tensor] = []
    for w, g in zip(weights, groups, strict=True):
        feats.append(F.conv2d(x, w, None, stride, same_padding(w.shape[-1], dilation), dilation, g))
    feats.reverse()
    return torch.cat(feats, dim=1)


def block_diagonal_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The dense (``groups=1``) weight that convolves like grouped ``weight``: its groups' blocks on the diagonal.

    Built with ``torch.diag_embed``, a copy whose backward takes the diagonal blocks back, so the gradient
    reaching ``weight`` is exactly the dense weight's gradient on those blocks.
    """
    if groups == 1:
        return weight
    out_chs, in_per_group, kh, kw = weight.shape
    # (G, O/G, I/G, kh, kw) with the group axis last, then spread over a new (G, G) diagonal pair of axes.
    per_group = weight.view(groups, out_chs // groups, in_per_group, kh, kw).permute(1, 2, 3, 4, 0)
    dense = torch.diag_embed(per_group, dim1=0, dim2=2)  # (G, O/G, G, I/G, kh, kw)
    return dense.reshape(out_chs, groups * in_per_group, kh, kw)


def psa_branch_convs_densified(
    x: torch.Tensor, weights: Sequence[torch.Tensor], groups: Sequence[int], stride: int, dilation: int
) -> torch.Tensor:
    """All branch convolutions as dense convolutions on block-diagonal weights; same result as the grouped form.

    Arguments and result as :func:`psa_branch_convs_grouped`. The zeros cost MACs (``groups`` times more per
    branch) but let cuDNN use its dense tensor-core kernels.
    """
    feats: List[torch.Tensor] = []
    for w, g in zip(weights, groups, strict=True):
        feats.append(
            F.conv2d(x, block_diagonal_weight(w, g), None, stride, same_padding(w.shape[-1], dilation), dilation)
        )
    feats.reverse()
    return torch.cat(feats, dim=1)


class BranchConvsKey(NamedTuple):
    """What the speed of a PSA module's branch convolutions depends on; one measured choice per key."""

    device: str  # name and compute capability of the GPU, or the device type
    dtype: str  # the dtype the convolutions run in (autocast's, if on); '+tf32' where cuDNN may use TF32
    memory_format: str  # 'nchw', 'channels_last' or 'strided'
    x_shape: Tuple[int, ...]
    weight_shapes: Tuple[Tuple[int, ...], ...]
    groups: Tuple[int, ...]
    stride: int
    dilation: int
    recording: bool  # autograd records: the backward runs too, so forward and backward are timed together

    def describe(self) -> str:
        """A short line for tables: input shape, kernels/groups, stride, dilation, dtype, layout, mode."""
        kernels = ' '.join(f'{w[-1]}x{w[-1]}/{g}' for w, g in zip(self.weight_shapes, self.groups, strict=True))
        mode = 'fwd+bwd' if self.recording else 'fwd'
        return (
            f'x {"x".join(map(str, self.x_shape))} {self.memory_format}, {kernels}, stride {self.stride}, '
            f'dilation {self.dilation}, {self.dtype}, {mode}'
        )


@functools.cache
def _device_name(device: torch.device) -> str:
    """GPU name and compute capability (asked once per device: the key is built on every call)."""
    if device.type != 'cuda':
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f'{torch.cuda.get_device_name(device)} (sm_{major}{minor})'


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast gives convolutions on ``device_type`` now, or None where autocast is off."""
    if hasattr(torch, 'get_autocast_dtype'):  # torch >= 2.4
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == 'cuda':
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def _compute_dtype(x: torch.Tensor) -> str:
    dtype = x.dtype
    if dtype.is_floating_point:
        dtype = _autocast_dtype(x.device.type) or dtype
    name = str(dtype).removeprefix('torch.')
    if dtype == torch.float32 and x.device.type == 'cuda' and torch.backends.cudnn.allow_tf32:
        name += '+tf32'
    return name


def _memory_format(x: torch.Tensor) -> str:
    if x.is_contiguous():
        return 'nchw'
    return 'channels_last' if x.is_contiguous(memory_format=torch.channels_last) else 'strided'


def _records_autograd(args: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in _tensors(args))


def branch_convs_key(
    x: torch.Tensor, weights: Sequence[torch.Tensor], groups: Sequence[int], stride: int, dilation: int
) -> BranchConvsKey:
    """The :class:`BranchConvsKey` of a call of the branch convolutions, in the calling context (autocast, grad)."""
    return BranchConvsKey(
        device=_device_name(x.device),
        dtype=_compute_dtype(x),
        memory_format=_memory_format(x),
        x_shape=tuple(x.shape),
        weight_shapes=tuple(tuple(w.shape) for w in weights),
        groups=tuple(groups),
        stride=stride,
        dilation=dilation,
        recording=_records_autograd((x, weights)),
    )


@dataclass(frozen=True)
class Choice:
    """A measured choice: the fastest candidate, every candidate's time (seconds per call) and what failed."""

    name: str
    seconds: Dict[str, float] = field(default_factory=dict)
    errors: Dict[str, str] = field(default_factory=dict)


# Process-wide: (key, candidate names) -> Choice. A different candidate set (e.g. no Triton) is measured anew.
_CHOICES: Dict[Tuple[Hashable, Tuple[str, ...]], Choice] = {}
_FORCED: Optional[str] = None

Timer = Callable[[Callable[..., Any], Sequence[Any], bool], float]


def force(name: Optional[str]) -> None:
    """Make :func:`choose` return candidate ``name`` without measuring (for debugging); ``None`` undoes it.

    Takes precedence over the ``TIMM_EPSANET_PSA_FORCE`` environment variable.
    """
    global _FORCED
    _FORCED = name or None


def forced_candidate() -> Optional[str]:
    """The candidate forced by :func:`force` or by ``TIMM_EPSANET_PSA_FORCE``, or None."""
    return _FORCED or os.environ.get(FORCE_ENV) or None


def choices() -> Dict[Hashable, Choice]:
    """The choices measured so far in this process, by key (a copy)."""
    return {key: choice for (key, _), choice in _CHOICES.items()}


def clear_choices() -> None:
    """Forget every measured choice: the next call of each key measures again."""
    _CHOICES.clear()


def _tensors(args: Any) -> List[torch.Tensor]:
    """The tensors in ``args``, looking inside lists and tuples."""
    if isinstance(args, torch.Tensor):
        return [args]
    if isinstance(args, (list, tuple)):
        return [t for a in args for t in _tensors(a)]
    return []


def _detached(args: Any) -> Any:
    """``args`` with every tensor detached (keeping ``requires_grad``): timing must not touch real gradients."""
    if isinstance(args, torch.Tensor):
        return args.detach().requires_grad_(args.requires_grad)
    if isinstance(args, (list, tuple)):
        return type(args)(_detached(a) for a in args)
    return args


def _is_compiling() -> bool:
    compiler = getattr(torch, 'compiler', None)
    if hasattr(compiler, 'is_compiling'):  # torch >= 2.3
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()


def _may_measure(args: Sequence[Any]) -> bool:
    """False where timing would be wrong or impossible: while torch.compile traces, or under CUDA graph capture."""
    if _is_compiling():
        return False
    capturing = any(t.is_cuda for t in _tensors(args)) and torch.cuda.is_current_stream_capturing()
    return not capturing


def _step(fn: Callable[..., Any], args: Sequence[Any], training: bool) -> Callable[[], None]:
    """One call of ``fn`` as the model makes it: forward, plus the backward to every input needing a gradient."""
    args = _detached(args)
    inputs = [t for t in _tensors(args) if t.requires_grad]
    if not training or not inputs:
        return lambda: fn(*args)

    def forward_backward() -> None:
        with torch.enable_grad():
            out = fn(*args)
            outs = _tensors(out)
            # ones_like keeps each output's memory format, so the backward runs in the layout it will have.
            torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs], allow_unused=True)

    return forward_backward


def _time_with_events(run: Callable[[], None], reps: int, event_factory: Callable[..., Any]) -> float:
    """Median seconds of ``reps`` calls of ``run``, timed on the GPU between CUDA events (one pair per call)."""
    events = [event_factory(enable_timing=True) for _ in range(reps + 1)]
    events[0].record()
    for i in range(reps):
        run()
        events[i + 1].record()
    events[-1].synchronize()
    return statistics.median(events[i].elapsed_time(events[i + 1]) for i in range(reps)) / 1e3


def _time_with_clock(run: Callable[[], None], reps: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds of ``reps`` calls of ``run`` by the host clock (CPU tensors: the work is synchronous)."""
    seconds = []
    for _ in range(reps):
        t0 = clock()
        run()
        seconds.append(clock() - t0)
    return statistics.median(seconds)


def measure(fn: Callable[..., Any], args: Sequence[Any], training: bool, warmup: int = 2, reps: int = 5) -> float:
    """Seconds per call of ``fn(*args)`` (with its backward if ``training``): median of ``reps`` after ``warmup``.

    The warm-up covers cuDNN's algorithm search and Triton's autotuning, which happen on first use. CUDA
    tensors are timed with CUDA events on the current stream, others by the host clock.
    """
    run = _step(fn, args, training)
    for _ in range(warmup):
        run()
    if any(t.is_cuda for t in _tensors(args)):
        return _time_with_events(run, reps, torch.cuda.Event)
    return _time_with_clock(run, reps)


def choose(
    key: Hashable,
    candidates: Mapping[str, Callable[..., Any]],
    args: Sequence[Any],
    timer: Optional[Timer] = None,
) -> str:
    """Name of the fastest of ``candidates`` for ``key``, measured on ``args`` on the key's first call.

    Usage (the dispatcher lists its candidates in order of preference)::

        key = branch_convs_key(x, weights, groups, stride, dilation)
        args = (x, weights, groups, stride, dilation)
        name = choose(key, {'triton': f1, 'cudnn_grouped': f2, 'cudnn_densified': f3}, args)
        out = candidates[name](*args)

    * Each candidate runs as ``fn(*args)``; when autograd records (grad mode on and a tensor in ``args``
      requires grad) its backward is timed with it, on detached copies, so no ``.grad`` is touched.
    * A candidate that raises is skipped (with a warning, and its error kept in :func:`choices`); if all
      raise, RuntimeError. Ties go to the earlier candidate.
    * The choice is kept for the process per ``key`` and set of candidate names.
    * Nothing is measured while ``torch.compile`` traces or a CUDA graph is being captured: there the cached
      choice is used if there is one, else the first candidate (the dispatcher's preference).
    * :func:`force` or ``TIMM_EPSANET_PSA_FORCE`` overrides all of this; forcing a name that is not among the
      candidates raises ValueError.

    Args:
        key: Hashable description of everything the timing depends on, usually :func:`branch_convs_key`.
        candidates: Name -> implementation, in order of preference.
        args: Positional arguments for every candidate.
        timer: ``timer(fn, args, training) -> seconds``; defaults to :func:`measure`.
    """
    if not candidates:
        raise ValueError('choose: no candidates to choose from.')
    names = tuple(candidates)
    forced = forced_candidate()
    if forced is not None:
        if forced not in candidates:
            raise ValueError(
                f'PSA implementation {forced!r} is forced ({FORCE_ENV} or psa_cuda.force) but is not available '
                f'here; candidates: {", ".join(names)}.'
            )
        return forced
    cached = _CHOICES.get((key, names))
    if cached is not None:
        return cached.name
    if not _may_measure(args):
        return names[0]

    timer = timer or measure
    training = _records_autograd(args)
    seconds: Dict[str, float] = {}
    errors: Dict[str, str] = {}
    for name, fn in candidates.items():
        try:
            t = float(timer(fn, args, training))
        except Exception as e:  # noqa: BLE001  (any failure disqualifies the candidate, not the model)
            errors[name] = f'{type(e).__name__}: {e}'.splitlines()[0]
            warnings.warn(
                f'PSA candidate {name!r} failed while being timed and is skipped: {errors[name]}', stacklevel=2
            )
            continue
        if math.isfinite(t):
            seconds[name] = t
        else:
            errors[name] = f'non-finite time {t}'
    if not seconds:
        raise RuntimeError(
            f'Every PSA candidate failed for {key}: ' + '; '.join(f'{n}: {e}' for n, e in errors.items())
        )
    best = min(seconds, key=seconds.__getitem__)  # min keeps the first of equal times
    _CHOICES[(key, names)] = Choice(best, seconds, errors)
    return best


def format_choices() -> str:
    """The measured choices as a Markdown table (empty string if none): shape, choice, milliseconds per candidate."""
    table = choices()
    if not table:
        return ''
    names = list(dict.fromkeys(n for c in table.values() for n in (*c.seconds, *c.errors)))
    rows = [
        '| branch convolutions | chosen | ' + ' | '.join(f'{n} (ms)' for n in names) + ' |',
        '|---|---|' + '---:|' * len(names),
    ]
    for key, choice in table.items():
        cells = []
        for n in names:
            if n in choice.seconds:
                cells.append(f'{choice.seconds[n] * 1e3:.3f}')
            else:
                cells.append('failed' if n in choice.errors else '-')
        label = key.describe() if isinstance(key, BranchConvsKey) else str(key)
        rows.append(f'| {label} | {choice.name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(rows)
