"""Throughput and training memory of the EPSANet models against reference and timm baselines.

``python -m timm_epsanet.benchmark`` times every model in one process, interleaved: each round runs
all models once (in reverse order every other round), so that load from other processes and CPU
frequency changes hit all of them alike. It reports, per measurement, the median over rounds of each
model's throughput and of its per-round ratio to the reference EPSANet (same architecture run with
``psa_impl='reference'``, i.e. the straightforward PSA formulation that computes what the authors'
code computes) and to ``resnet50``. On CPU, ratios of wall time and of process CPU time are both given:
they disagree when other processes compete for the cores.

A model is named as for ``timm.create_model``; ``NAME:reference`` builds an EPSANet with the reference
PSA forward, ``NAME:triton`` one with the Triton kernels (``psa_impl='triton'``), ``NAME:fast`` the default.

On CUDA every round is timed between CUDA events, the warm-up is long enough for Triton's autotuning and
the first-use measurement of the PSA implementation per shape (``timm_epsanet.ops.psa_cuda``), whose
choices are printed, and the training-step memory is the peak of allocated GPU memory. ``--gpu-targets``
runs the table of issue 11's targets (224 px, channels_last, inference batch 256, training step batch 128,
bf16 / fp16 autocast and fp32, epsanet50 against its reference path and resnet50) and checks them.
"""

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_epsanet  # noqa: F401  (registers the EPSANet models)
from timm_epsanet.ops import psa_cuda
from timm_epsanet.ops.psa_triton import triton_unavailable_reason

DEFAULT_MODELS = 'epsanet50,epsanet50:reference,resnet50,seresnet50,resnest50d,res2net50_26w_4s'
FORMATS = {'nchw': torch.contiguous_format, 'cl': torch.channels_last}
PSA_SPEC_IMPLS = ('fast', 'reference', 'triton')
# Precision of a case: the autocast dtype, or None for no autocast. Short names are accepted on the command line.
PRECISIONS = {'float32': None, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
PRECISION_ALIASES = {'fp32': 'float32', 'bf16': 'bfloat16', 'fp16': 'float16', 'half': 'float16'}
# What --gpu-targets sets where the command line does not: issue 11's target table.
GPU_TARGETS_PRESET = {
    'models': 'epsanet50,epsanet50:reference,resnet50',
    'modes': 'infer,train',
    'batch_sizes': '256',
    'train_batch_sizes': '128',
    'formats': 'cl',
    'img_size': 224,
    'amp_dtype': 'bfloat16,float16,float32',
    'device': 'cuda',
}


@dataclass(frozen=True)
class Case:
    """One measurement: a mode, a batch size, the memory format of model and input, and the precision."""

    mode: str  # 'infer' or 'train'
    batch_size: int
    fmt: str  # key of FORMATS
    precision: str = 'float32'  # key of PRECISIONS

    def __str__(self) -> str:
        suffix = '' if self.precision == 'float32' else f' {self.precision}'
        return f'{self.mode} batch {self.batch_size} {self.fmt}{suffix}'


@dataclass
class Timings:
    """Seconds per batch, one entry per round."""

    wall: List[float] = field(default_factory=list)
    cpu: List[float] = field(default_factory=list)


def parse_model_spec(spec: str) -> Dict[str, object]:
    """``'epsanet50:reference'`` -> ``dict(name='epsanet50', kwargs=dict(psa_impl='reference'))``.

    The PSA implementation after the colon is passed to the model as ``psa_impl``: ``fast``, ``reference`` or
    ``triton``.
    """
    name, _, impl = spec.partition(':')
    if impl and impl not in PSA_SPEC_IMPLS:
        raise ValueError(f'Model spec {spec!r}: the part after ":" must be one of {", ".join(PSA_SPEC_IMPLS)}.')
    if not timm.is_model(name):
        raise ValueError(f'Model spec {spec!r}: timm has no model {name!r}.')
    if impl and not name.startswith('epsanet'):
        raise ValueError(f'Model spec {spec!r}: only EPSANet models have a PSA implementation to choose.')
    return {'name': name, 'kwargs': {'psa_impl': impl} if impl else {}}


def create(spec: str, device: torch.device) -> nn.Module:
    """Build the model a spec names (random init: timing does not depend on the weights)."""
    parsed = parse_model_spec(spec)
    return timm.create_model(parsed['name'], **parsed['kwargs']).to(device)


def describe_machine(device: torch.device) -> List[str]:
    """Lines saying what ran the benchmark: CPU, cores, threads, library versions, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    lines = [
        f'CPU: {cpu}; {os.cpu_count()} logical cores, {usable} usable by this process',
        f'torch {torch.__version__} (oneDNN {"on" if torch.backends.mkldnn.is_available() else "off"}), '
        f'timm {timm.__version__}, timm_epsanet {timm_epsanet.__version__}, python {platform.python_version()}',
        f'torch threads: {torch.get_num_threads()}',
    ]
    if device.type == 'cuda':
        lines.extend(describe_gpu(device))
    with suppress(OSError):
        lines.append(f'load average at start: {" ".join(f"{v:.2f}" for v in os.getloadavg())}')
    return lines


def describe_gpu(device: torch.device) -> List[str]:
    """Lines naming the GPU and the settings that change its timings (cuDNN autotuner, TF32, Triton)."""
    props = torch.cuda.get_device_properties(device)
    try:
        triton_version = importlib.import_module('triton').__version__
    except ImportError:
        triton_version = 'not installed'
    return [
        f'GPU: {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB), '
        f'CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, Triton {triton_version}',
        f'cudnn.benchmark={torch.backends.cudnn.benchmark}, TF32: cuDNN {torch.backends.cudnn.allow_tf32}, '
        f'matmul {torch.backends.cuda.matmul.allow_tf32}',
    ]


def autocast_context(device: torch.device, precision: str) -> Callable[[], Any]:
    """A factory of the context a step of ``precision`` runs in: autocast to its dtype, or nothing for float32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


class Runner:
    """Runs one model through inference or training steps of a case."""

    def __init__(self, spec: str, model: nn.Module, args: argparse.Namespace, device: torch.device):
        self.spec = spec
        self.eager = model
        self.args = args
        self.device = device
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
        self.model: Callable = torch.compile(model) if args.compile else model
        self.autocast: Callable[[], Any] = nullcontext

    def prepare(self, case: Case) -> None:
        """Set the model's memory format, mode and precision for a case (parameters stay in the model)."""
        self.eager.to(memory_format=FORMATS[case.fmt])
        self.eager.train(case.mode == 'train')
        self.autocast = autocast_context(self.device, case.precision)

    def step(self, case: Case, x: torch.Tensor, target: torch.Tensor) -> None:
        if case.mode == 'infer':
            with torch.no_grad(), self.autocast():
                self.model(x)
        else:
            with self.autocast():
                loss = F.cross_entropy(self.model(x), target)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class HostClock:
    """Wall and process CPU time of a stretch of synchronous (CPU) work."""

    def __init__(self, wall: Callable[[], float] = time.perf_counter, cpu: Callable[[], float] = time.process_time):
        self.wall, self.cpu = wall, cpu

    def start(self) -> None:
        self.wall0, self.cpu0 = self.wall(), self.cpu()

    def stop(self) -> Tuple[float, float]:
        """(wall seconds, process CPU seconds) since :meth:`start`."""
        return self.wall() - self.wall0, self.cpu() - self.cpu0


class CudaEventClock:
    """GPU time of a stretch of queued work, between two CUDA events on the current stream.

    :meth:`start` first waits for the GPU to be idle, so the stretch holds only the work queued after it;
    :meth:`stop` waits for the end event. The process CPU time is returned beside it (the host's share).
    """

    def __init__(
        self,
        device: torch.device,
        event_factory: Callable[..., Any] = torch.cuda.Event,
        synchronize: Callable[[torch.device], None] = torch.cuda.synchronize,
        cpu: Callable[[], float] = time.process_time,
    ):
        self.device, self.event_factory, self.synchronize, self.cpu = device, event_factory, synchronize, cpu

    def start(self) -> None:
        self.synchronize(self.device)
        self.begin = self.event_factory(enable_timing=True)
        self.end = self.event_factory(enable_timing=True)
        self.cpu0 = self.cpu()
        self.begin.record()

    def stop(self) -> Tuple[float, float]:
        """(GPU seconds, process CPU seconds) since :meth:`start`."""
        self.end.record()
        self.end.synchronize()
        return self.begin.elapsed_time(self.end) / 1e3, self.cpu() - self.cpu0


def make_clock(device: torch.device) -> Any:
    """The clock a device's steps are timed with: CUDA events on CUDA, the host's clocks elsewhere."""
    return CudaEventClock(device) if device.type == 'cuda' else HostClock()


def default_warmup(device: torch.device) -> int:
    """Untimed steps per model and case: enough on CUDA for cuDNN's search, Triton's autotuning and the
    first-use measurement of the PSA implementation, which all happen in the first steps of a new shape."""
    return 10 if device.type == 'cuda' else 2


def time_case(
    runners: Sequence[Runner], case: Case, args: argparse.Namespace, device: torch.device
) -> Dict[str, Timings]:
    """Interleaved timing of all runners for one case; returns seconds per batch per round."""
    x = torch.randn(case.batch_size, 3, args.img_size, args.img_size, device=device)
    x = x.contiguous(memory_format=FORMATS[case.fmt])
    target = torch.randint(0, 1000, (case.batch_size,), device=device)
    # Auto: enough steps per round to outlast timer and scheduling noise at small batches.
    iters = args.iters or (max(1, 4 // case.batch_size) if device.type == 'cpu' else 20)
    warmup = default_warmup(device) if args.warmup < 0 else args.warmup
    clock = make_clock(device)
    results = {r.spec: Timings() for r in runners}
    for r in runners:  # warm up: allocator, oneDNN / cuDNN algorithm caches, autotuning, compilation
        r.prepare(case)
        t0 = time.perf_counter()
        for _ in range(warmup):
            r.step(case, x, target)
        _sync(device)
        if args.verbose:
            print(f'  warm-up {r.spec} ({case}): {time.perf_counter() - t0:.1f}s', file=sys.stderr, flush=True)
    for i in range(args.rounds):
        order = runners if i % 2 == 0 else list(reversed(runners))
        for r in order:
            r.prepare(case)
            clock.start()
            for _ in range(iters):
                r.step(case, x, target)
            wall, cpu = clock.stop()
            results[r.spec].wall.append(wall / iters)
            results[r.spec].cpu.append(cpu / iters)
        line = ' '.join(f'{r.spec}={case.batch_size / results[r.spec].wall[-1]:.2f}' for r in runners)
        print(f'[{case}] round {i + 1}/{args.rounds} img/s: {line}', file=sys.stderr, flush=True)
    return results


def _median_ratio(num: List[float], den: List[float]) -> float:
    """Median over rounds of den/num time ratios, i.e. of the throughput ratio num-model / den-model."""
    return statistics.median(d / n for n, d in zip(num, den, strict=True))


def reference_spec(spec: str, specs: Sequence[str]) -> Optional[str]:
    """The ``NAME:reference`` spec among ``specs`` that ``spec`` should be compared with."""
    name = spec.partition(':')[0]
    ref = f'{name}:reference'
    if ref in specs:
        return ref
    return 'epsanet50:reference' if 'epsanet50:reference' in specs else None


def format_table(case: Case, results: Dict[str, Timings], specs: Sequence[str], gpu: bool = False) -> str:
    """A Markdown table of one case: img/s and median per-round ratios (wall / CPU; GPU time alone if ``gpu``).

    On a GPU the process CPU time says how busy the host was launching work, not how fast the model is,
    so only the GPU-time ratio is given.
    """
    unit = '(GPU time)' if gpu else '(wall / cpu)'
    rows = [
        f'### {case}',
        '',
        f'| model | img/s | vs reference EPSANet {unit} | vs resnet50 {unit} |',
        '|---|---:|---:|---:|',
    ]
    for spec in specs:
        t = results[spec]
        ips = case.batch_size / statistics.median(t.wall)
        cols = []
        for other in (reference_spec(spec, specs), 'resnet50' if 'resnet50' in specs else None):
            if other is None:
                cols.append('-')
            elif gpu:
                cols.append(f'{_median_ratio(t.wall, results[other].wall):.2f}x')
            else:
                o = results[other]
                cols.append(f'{_median_ratio(t.wall, o.wall):.2f}x / {_median_ratio(t.cpu, o.cpu):.2f}x')
        rows.append(f'| {spec} | {ips:.2f} | {cols[0]} | {cols[1]} |')
    return '\n'.join(rows)


def _training_setup(
    spec: str, batch_size: int, img_size: int, fmt: str, device: torch.device, precision: str = 'float32'
) -> Callable[[], None]:
    """A training step (forward, cross-entropy, backward, SGD with momentum) of a freshly built model."""
    model = create(spec, device).to(memory_format=FORMATS[fmt]).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device).contiguous(memory_format=FORMATS[fmt])
    target = torch.randint(0, 1000, (batch_size,), device=device)
    autocast = autocast_context(device, precision)

    def step() -> None:
        with autocast():
            loss = F.cross_entropy(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


class CudaPeakMemory:
    """Allocated CUDA memory and its peak over a stretch of work, from the caching allocator's statistics.

    Counts tensors (not what the allocator holds in reserve), as ``torch.cuda.memory_allocated`` and
    ``max_memory_allocated`` do; ``cuda`` is the ``torch.cuda`` module (a stand-in in tests).
    """

    def __init__(self, device: torch.device, cuda: Any = torch.cuda):
        self.device, self.cuda = device, cuda

    def allocated_mib(self) -> float:
        """MiB allocated now."""
        self.cuda.synchronize(self.device)
        return self.cuda.memory_allocated(self.device) / 2**20

    def start(self) -> None:
        self.cuda.synchronize(self.device)
        self.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float:
        """MiB allocated at the peak since :meth:`start`."""
        self.cuda.synchronize(self.device)
        return self.cuda.max_memory_allocated(self.device) / 2**20


def training_peak_cuda_memory(
    spec: str, batch_size: int, img_size: int, fmt: str, device: torch.device, precision: str = 'float32'
) -> float:
    """Peak GPU memory (MiB) of two training steps of one model: its parameters, gradients, optimizer state,
    input batch and activations at the worst moment, after one untimed step.

    Counted from what was allocated before the model was built, so it can run in the benchmark's own process
    (other models' tensors do not count, and kernels tuned during the timing are not tuned again). The
    untimed first step, where a new process would measure the PSA implementation per shape and autotune
    kernels, is left out of the peak.
    """
    meter = CudaPeakMemory(device)
    base = meter.allocated_mib()
    step = _training_setup(spec, batch_size, img_size, fmt, device, precision)
    step()
    meter.start()
    for _ in range(2):
        step()
    return meter.peak_mib() - base


def training_peak_memory(
    spec: str, batch_size: int, img_size: int, fmt: str, device: torch.device, precision: str = 'float32'
) -> float:
    """Peak memory (MiB) added by two training steps of one model, over what the built model holds.

    On CPU: the process's peak resident set during the steps (reset first through /proc/self/clear_refs)
    minus its resident set before them; best run in a fresh process, as :func:`memory_in_subprocess` does.
    It includes what the C allocator keeps of freed blocks, so it varies by tens of MiB from run to run.
    On CUDA: the peak of allocated device memory minus the memory allocated before the steps (see
    :func:`training_peak_cuda_memory` for the whole peak, which the benchmark reports on CUDA).
    """
    step = _training_setup(spec, batch_size, img_size, fmt, device, precision)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    elif _reset_peak_rss():
        base = _proc_status_bytes('VmRSS')
    else:  # no resettable peak: the peak of building the model may hide a smaller training peak
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    for _ in range(2):
        step()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    elif _proc_status_bytes('VmHWM') is not None:
        peak = _proc_status_bytes('VmHWM')
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (peak - base) / 2**20


def training_peak_tensor_memory(
    spec: str, batch_size: int, img_size: int, fmt: str, precision: str = 'float32'
) -> Optional[float]:
    """Peak of live CPU tensor memory (MiB) during the second training step of one model, or None.

    Read from ``torch.profiler``'s memory timeline, which follows every tensor allocation and free: unlike
    the resident set it does not depend on how the C allocator keeps and reuses freed blocks, so two
    models that hold the same tensors read the same. None where this torch cannot export the timeline.
    """
    step = _training_setup(spec, batch_size, img_size, fmt, torch.device('cpu'), precision)
    step()  # the optimizer's momentum buffers exist from the second step on
    activities = [torch.profiler.ProfilerActivity.CPU]
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter('ignore')  # export_memory_timeline announces its future deprecation
            with torch.profiler.profile(
                activities=activities, profile_memory=True, record_shapes=True, with_stack=True
            ) as prof:
                step()
            path = os.path.join(tmp, 'memory.json')
            prof.export_memory_timeline(path, device='cpu')
            with open(path) as f:
                _, sizes = json.load(f)  # [times, bytes per memory category at each time]
    except (AttributeError, RuntimeError, ValueError, OSError):
        return None
    return max(sum(per_category) for per_category in sizes) / 2**20


def _proc_status_bytes(key: str) -> Optional[int]:
    """A memory figure of this process from /proc/self/status (Linux), in bytes, or None."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident set (VmHWM) so it measures from now on (Linux >= 4.0)."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        return False
    return _proc_status_bytes('VmRSS') is not None


def memory_in_subprocess(
    spec: str,
    batch_size: int,
    img_size: int,
    fmt: str,
    device: str,
    threads: int,
    precision: str = 'float32',
    extra_args: Sequence[str] = (),
) -> Dict[str, Optional[float]]:
    """Training-step memory of one model measured in a fresh interpreter, so that no other model counts.

    Returns ``{'rss': ..., 'tensors': ..., 'cuda': ...}`` in MiB, None where a figure does not apply. On CPU:
    :func:`training_peak_memory` (peak resident set) and :func:`training_peak_tensor_memory` (peak of live
    tensors). On CUDA: :func:`training_peak_cuda_memory` (peak allocated GPU memory). ``extra_args`` are
    further options of this command line (e.g. ``--no-tf32``), so the probe runs as the benchmark does.
    """
    cmd = [
        sys.executable,
        '-m',
        'timm_epsanet.benchmark',
        '--memory-probe',
        spec,
        '--img-size',
        str(img_size),
        '--train-batch-sizes',
        str(batch_size),
        '--formats',
        fmt,
        '--amp-dtype',
        precision,
        '--device',
        device,
        '--threads',
        str(threads),
        *extra_args,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f'Memory probe of {spec} failed:\n{out.stderr[-2000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def _precision(name: str) -> str:
    name = PRECISION_ALIASES.get(name, name)
    if name not in PRECISIONS:
        raise ValueError(repr(name))
    return name


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default and keeps the examples' line breaks."""


EXAMPLES = """\
examples:
  python -m timm_epsanet.benchmark                                # CPU defaults: ~10 min on 2 cores
  python -m timm_epsanet.benchmark --threads 2 --rounds 7
  python -m timm_epsanet.benchmark --models epsanet101,epsanet101:reference,resnet101 --modes infer
  python -m timm_epsanet.benchmark --compile --formats nchw --modes infer --batch-sizes 8
  python -m timm_epsanet.benchmark --gpu-targets                  # issue 11's GPU table, targets checked
  python -m timm_epsanet.benchmark --device cuda --channels-last --amp-dtype bfloat16 \\
      --models epsanet50,epsanet50:triton,epsanet50:reference,resnet50 --batch-sizes 256 --train-batch-sizes 128
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m timm_epsanet.benchmark``."""
    parser = argparse.ArgumentParser(
        prog='python -m timm_epsanet.benchmark',
        description='Interleaved throughput / training-memory benchmark of EPSANet vs reference and timm models.',
        formatter_class=_HelpFormatter,
        epilog=EXAMPLES,
    )
    parser.add_argument(
        '--models',
        default=DEFAULT_MODELS,
        help='comma-separated timm model names; an EPSANet may end in :reference (plain PSA), :triton or :fast',
    )
    parser.add_argument('--modes', default='infer,train', help='comma-separated subset of infer,train')
    parser.add_argument('--batch-sizes', default='1,16', help='inference batch sizes, comma-separated')
    parser.add_argument('--train-batch-sizes', default='8', help='training-step (SGD) batch sizes, comma-separated')
    parser.add_argument('--formats', default='nchw,cl', help='memory formats of model and input: nchw, cl')
    parser.add_argument('--channels-last', action='store_true', help='shorthand for --formats cl')
    parser.add_argument('--img-size', type=int, default=224, help='image side in pixels')
    parser.add_argument('--rounds', type=int, default=3, help='interleaved rounds per measurement')
    parser.add_argument(
        '--iters', type=int, default=0, help='steps per model per round (0: 20 on CUDA, ~4 images on CPU)'
    )
    parser.add_argument(
        '--warmup',
        type=int,
        default=-1,
        help='untimed steps per model and case before the rounds (-1: 10 on CUDA, for autotuning and the '
        'first-use choice of PSA implementation; 2 on CPU)',
    )
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    parser.add_argument('--device', default='cpu', help='cpu or cuda[:N]')
    parser.add_argument(
        '--amp', action='store_true', help='autocast: float16 on CUDA, bfloat16 on CPU (see --amp-dtype)'
    )
    parser.add_argument(
        '--amp-dtype',
        default='auto',
        help='comma-separated precisions to run, each a case of its own: bfloat16, float16 (autocast) or float32 '
        '(none); auto: float32, or what --amp names',
    )
    parser.add_argument(
        '--tf32',
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CUDA: allow TF32 tensor cores for float32 convolutions and matmuls (also the Triton kernels' switch)",
    )
    parser.add_argument(
        '--cudnn-benchmark',
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CUDA: let cuDNN time its algorithms per shape (torch.backends.cudnn.benchmark), as timm's benchmark",
    )
    parser.add_argument('--compile', action='store_true', help='torch.compile every model (slow first steps)')
    parser.add_argument(
        '--memory',
        action=argparse.BooleanOptionalAction,
        default=True,
        help='training peak memory, each model in a fresh process',
    )
    parser.add_argument(
        '--gpu-targets',
        action='store_true',
        help="run issue 11's target table (unless overridden: --device cuda --models "
        f'{GPU_TARGETS_PRESET["models"]} --channels-last --batch-sizes 256 --train-batch-sizes 128 '
        '--amp-dtype bfloat16,float16,float32 --img-size 224) and print each target as met or not',
    )
    parser.add_argument('--verbose', action='store_true', help='also report warm-up times')
    parser.add_argument('--memory-probe', default='', help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.gpu_targets:  # the preset fills in only what the command line leaves at its default
        parser.set_defaults(**GPU_TARGETS_PRESET)
        args = parser.parse_args(argv)
    if args.channels_last:
        args.formats = 'cl'
    args.model_list = [s for s in args.models.split(',') if s]
    args.mode_list = [m for m in args.modes.split(',') if m]
    args.format_list = [f for f in args.formats.split(',') if f]
    for m in args.mode_list:
        if m not in ('infer', 'train'):
            parser.error(f'--modes: unknown mode {m!r} (use infer, train)')
    for f in args.format_list:
        if f not in FORMATS:
            parser.error(f'--formats: unknown format {f!r} (use nchw, cl)')
    if args.amp_dtype != 'auto':
        try:
            args.precision_list = list(dict.fromkeys(_precision(p) for p in args.amp_dtype.split(',') if p))
        except ValueError as e:
            parser.error(f'--amp-dtype: unknown precision {e} (use {", ".join(PRECISIONS)})')
        if not args.precision_list:
            parser.error('--amp-dtype: name at least one precision')
    elif args.amp:
        args.precision_list = ['float16' if args.device.startswith('cuda') else 'bfloat16']
    else:
        args.precision_list = ['float32']
    try:
        args.batch_list = [int(b) for b in args.batch_sizes.split(',') if b]
        args.train_batch_list = [int(b) for b in args.train_batch_sizes.split(',') if b]
    except ValueError:
        parser.error('--batch-sizes / --train-batch-sizes take comma-separated integers')
    if args.rounds < 1:
        parser.error('--rounds must be at least 1')
    if args.warmup < -1:
        parser.error('--warmup must be a number of steps, or -1 for the device default')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available to torch')
    if not args.memory_probe:
        for spec in args.model_list:
            try:
                impl = parse_model_spec(spec)['kwargs'].get('psa_impl')
            except ValueError as e:
                parser.error(str(e))
            if impl == 'triton':
                reason = triton_unavailable_reason(torch.device(args.device))
                if reason:
                    parser.error(f'Model spec {spec!r}: Triton PSA kernels cannot run here: {reason}')
    return args


def _passthrough_args(args: argparse.Namespace) -> List[str]:
    """Options of this run that the memory probes must repeat to measure the same thing."""
    return [
        '--tf32' if args.tf32 else '--no-tf32',
        '--cudnn-benchmark' if args.cudnn_benchmark else '--no-cudnn-benchmark',
    ]


def apply_cuda_settings(args: argparse.Namespace) -> None:
    """Set the process-wide CUDA switches the options name (cuDNN autotuner, TF32)."""
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32


# Issue 11's targets: (precision, mode, compared with, lowest acceptable throughput ratio).
# 'reference' = the same EPSANet with psa_impl='reference'; 'bfloat16' = the same model and case in bfloat16.
GPU_TARGETS = (
    ('bfloat16', 'infer', 'reference', 1.5),
    ('bfloat16', 'train', 'reference', 1.5),
    ('bfloat16', 'infer', 'resnet50', 0.5),
    ('bfloat16', 'train', 'resnet50', 0.5),
    ('float16', 'infer', 'bfloat16', 0.9),
    ('float16', 'train', 'bfloat16', 0.9),
    ('float32', 'infer', 'reference', 1.3),
    ('float32', 'train', 'reference', 1.3),
)


def target_report(
    results: Dict[Case, Dict[str, Timings]],
    specs: Sequence[str],
    memory: Optional[Dict[Tuple[str, int, str, str], Dict[str, Optional[float]]]] = None,
) -> str:
    """Issue 11's targets as a Markdown table, each measured value marked met or not, for every EPSANet spec
    that has its reference path in ``specs``.

    Ratios against the reference and resnet50 are medians of per-round ratios (interleaved in one case); the
    float16-vs-bfloat16 ratio compares the two cases' median throughputs (measured one case after the other).
    Memory: the training step's peak (GPU memory on CUDA, live tensors on CPU) against the reference path's.
    """
    rows = ['| model | case | target | measured | met |', '|---|---|---|---:|---|']
    by_key = {(c.mode, c.batch_size, c.fmt, c.precision): (c, r) for c, r in results.items()}
    for spec in specs:
        ref = f'{spec.partition(":")[0]}:reference'
        if spec == ref or ref not in specs:
            continue
        for case, timings in results.items():
            for precision, mode, other, least in GPU_TARGETS:
                if (case.precision, case.mode) != (precision, mode):
                    continue
                if other == 'bfloat16':
                    bf16 = by_key.get((case.mode, case.batch_size, case.fmt, 'bfloat16'))
                    if bf16 is None:
                        continue
                    ratio = statistics.median(bf16[1][spec].wall) / statistics.median(timings[spec].wall)
                    what = f'>= {least}x its bfloat16 speed'
                else:
                    other_spec = ref if other == 'reference' else other
                    if other_spec not in timings:
                        continue
                    ratio = _median_ratio(timings[spec].wall, timings[other_spec].wall)
                    what = f'>= {least}x {other_spec}'
                rows.append(f'| {spec} | {case} | {what} | {ratio:.2f}x | {"yes" if ratio >= least else "NO"} |')
        for (mem_spec, b, fmt, precision), mem in (memory or {}).items():
            ref_mem = (memory or {}).get((ref, b, fmt, precision))
            if mem_spec != spec or ref_mem is None:
                continue
            kind = 'cuda' if mem.get('cuda') is not None else 'tensors'
            if mem.get(kind) is None or ref_mem.get(kind) is None:
                continue
            case = Case('train', b, fmt, precision)
            met = mem[kind] <= ref_mem[kind]
            rows.append(
                f'| {spec} | {case} | peak memory <= {ref} ({ref_mem[kind]:.0f} MiB) | {mem[kind]:.0f} MiB | '
                f'{"yes" if met else "NO"} |'
            )
    return '\n'.join(rows) if len(rows) > 2 else ''


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Timings]]:
    """Run the benchmark and print its report; returns the raw timings per case."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == 'cuda':
        apply_cuda_settings(args)
    if args.memory_probe:
        probe = (args.memory_probe, args.train_batch_list[0], args.img_size, args.format_list[0])
        precision = args.precision_list[0]
        if device.type == 'cuda':
            result = {'rss': None, 'tensors': None, 'cuda': training_peak_cuda_memory(*probe, device, precision)}
        else:
            result = {
                'rss': training_peak_memory(*probe, device, precision),
                'tensors': training_peak_tensor_memory(*probe, precision),
                'cuda': None,
            }
        print(json.dumps(result))
        return {}

    gpu = device.type == 'cuda'
    header = describe_machine(device)
    header.append(
        f'device {device}, image {args.img_size}px, {args.rounds} rounds, precision {",".join(args.precision_list)}, '
        f'compile={args.compile}; ratios are medians of per-round throughput ratios '
        + ('(GPU time between CUDA events)' if gpu else '(wall / process CPU time)')
    )
    print('\n'.join(header), flush=True)

    runners = [Runner(spec, create(spec, device), args, device) for spec in args.model_list]
    cases = [
        Case(mode, b, fmt, precision)
        for precision in args.precision_list
        for mode in args.mode_list
        for b in (args.batch_list if mode == 'infer' else args.train_batch_list)
        for fmt in args.format_list
    ]
    all_results: Dict[str, Dict[str, Timings]] = {}
    by_case: Dict[Case, Dict[str, Timings]] = {}
    for case in cases:
        results = time_case(runners, case, args, device)
        all_results[str(case)] = results
        by_case[case] = results
        print('\n' + format_table(case, results, args.model_list, gpu=gpu), flush=True)

    chosen = psa_cuda.format_choices()
    if chosen:
        print('\n### PSA branch convolutions: implementation chosen per shape (measured on first use)\n')
        print(chosen, flush=True)

    memory: Dict[Tuple[str, int, str, str], Dict[str, Optional[float]]] = {}
    if args.memory and 'train' in args.mode_list:
        if gpu:
            print(
                '\n### training-step peak memory, MiB: allocated GPU memory (model, gradients, optimizer state, '
                'batch, activations; after one untimed step; a freshly built model, counted on its own)\n'
            )
        else:
            print(
                '\n### training-step peak memory, MiB: live tensors (torch profiler) / process resident set '
                '(over the built model; fresh process per model)\n'
            )
        columns = [(b, f, p) for p in args.precision_list for b in args.train_batch_list for f in args.format_list]
        print(
            '| model | ' + ' | '.join(str(Case('train', b, f, p)).removeprefix('train ') for b, f, p in columns) + ' |'
        )
        print('|---|' + '---:|' * len(columns))
        for spec in args.model_list:
            cells = []
            for b, f, p in columns:
                print(f'[memory] {spec} {Case("train", b, f, p)}', file=sys.stderr, flush=True)
                if gpu:  # exact per model in this process, with the kernels already tuned
                    cuda_mib = training_peak_cuda_memory(spec, b, args.img_size, f, device, p)
                    mem = {'rss': None, 'tensors': None, 'cuda': cuda_mib}
                else:  # the resident set needs a process of its own
                    mem = memory_in_subprocess(
                        spec, b, args.img_size, f, args.device, torch.get_num_threads(), p, _passthrough_args(args)
                    )
                memory[(spec, b, f, p)] = mem
                if gpu:
                    cells.append(f'{mem["cuda"]:.0f}')
                else:
                    tensors = 'n/a' if mem['tensors'] is None else f'{mem["tensors"]:.0f}'
                    cells.append(f'{tensors} / {mem["rss"]:.0f}')
            print(f'| {spec} | ' + ' | '.join(cells) + ' |', flush=True)

    if args.gpu_targets:
        report = target_report(by_case, args.model_list, memory)
        print('\n### issue 11 targets\n')
        print(report or 'No target applies to the models and cases run.', flush=True)
    return all_results


if __name__ == '__main__':
    main()
