"""Throughput and training memory of the EPSANet models against reference and timm baselines.

``python -m timm_epsanet.benchmark`` times every model in one process, interleaved: each round runs
all models once (in reverse order every other round), so that load from other processes and CPU
frequency changes hit all of them alike. It reports, per measurement, the median over rounds of each
model's throughput and of its per-round ratio to the reference EPSANet (same architecture run with
``psa_impl='reference'``, i.e. the straightforward PSA formulation that computes what the authors'
code computes) and to ``resnet50``. Ratios of wall time and of process CPU time are both given: they
disagree when other processes compete for the cores.

A model is named as for ``timm.create_model``; ``NAME:reference`` builds an EPSANet with the reference
PSA forward. Examples::

    python -m timm_epsanet.benchmark                                 # defaults: a few minutes on 2 cores
    python -m timm_epsanet.benchmark --threads 2 --rounds 7
    python -m timm_epsanet.benchmark --models epsanet101,epsanet101:reference,resnet101 --modes infer
    python -m timm_epsanet.benchmark --compile --formats nchw --modes infer --batch-sizes 8
    python -m timm_epsanet.benchmark --device cuda --amp --batch-sizes 64,256 --train-batch-sizes 64
"""

import argparse
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
from typing import Callable, Dict, List, Optional, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_epsanet  # noqa: F401  (registers the EPSANet models)

DEFAULT_MODELS = 'epsanet50,epsanet50:reference,resnet50,seresnet50,resnest50d,res2net50_26w_4s'
FORMATS = {'nchw': torch.contiguous_format, 'cl': torch.channels_last}


@dataclass
class Case:
    """One measurement: a mode, a batch size and the memory format of model and input."""

    mode: str  # 'infer' or 'train'
    batch_size: int
    fmt: str  # key of FORMATS

    def __str__(self) -> str:
        return f'{self.mode} batch {self.batch_size} {self.fmt}'


@dataclass
class Timings:
    """Seconds per batch, one entry per round."""

    wall: List[float] = field(default_factory=list)
    cpu: List[float] = field(default_factory=list)


def parse_model_spec(spec: str) -> Dict[str, object]:
    """``'epsanet50:reference'`` -> ``dict(name='epsanet50', kwargs=dict(psa_impl='reference'))``."""
    name, _, impl = spec.partition(':')
    if impl and impl not in ('fast', 'reference'):
        raise ValueError(f'Model spec {spec!r}: the part after ":" must be "fast" or "reference".')
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
        lines.append(f'GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}')
    with suppress(OSError):
        lines.append(f'load average at start: {" ".join(f"{v:.2f}" for v in os.getloadavg())}')
    return lines


class Runner:
    """Runs one model through inference or training steps of a case."""

    def __init__(self, spec: str, model: nn.Module, args: argparse.Namespace, device: torch.device):
        self.spec = spec
        self.eager = model
        self.args = args
        self.device = device
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
        self.model: Callable = torch.compile(model) if args.compile else model
        amp_dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if args.amp else nullcontext

    def prepare(self, case: Case) -> None:
        """Set the model's memory format and mode for a case (parameters stay in the model)."""
        self.eager.to(memory_format=FORMATS[case.fmt])
        self.eager.train(case.mode == 'train')

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


def time_case(
    runners: Sequence[Runner], case: Case, args: argparse.Namespace, device: torch.device
) -> Dict[str, Timings]:
    """Interleaved timing of all runners for one case; returns seconds per batch per round."""
    x = torch.randn(case.batch_size, 3, args.img_size, args.img_size, device=device)
    x = x.contiguous(memory_format=FORMATS[case.fmt])
    target = torch.randint(0, 1000, (case.batch_size,), device=device)
    # Auto: enough steps per round to outlast timer and scheduling noise at small batches.
    iters = args.iters or (max(1, 4 // case.batch_size) if device.type == 'cpu' else 20)
    results = {r.spec: Timings() for r in runners}
    for r in runners:  # warm up: allocator, oneDNN primitive caches, compilation
        r.prepare(case)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            r.step(case, x, target)
        _sync(device)
        if args.verbose:
            print(f'  warm-up {r.spec} ({case}): {time.perf_counter() - t0:.1f}s', file=sys.stderr, flush=True)
    for i in range(args.rounds):
        order = runners if i % 2 == 0 else list(reversed(runners))
        for r in order:
            r.prepare(case)
            _sync(device)
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for _ in range(iters):
                r.step(case, x, target)
            _sync(device)
            results[r.spec].wall.append((time.perf_counter() - wall0) / iters)
            results[r.spec].cpu.append((time.process_time() - cpu0) / iters)
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


def format_table(case: Case, results: Dict[str, Timings], specs: Sequence[str]) -> str:
    """A Markdown table of one case: img/s and median per-round ratios (wall / CPU)."""
    rows = [
        f'### {case}',
        '',
        '| model | img/s | vs reference EPSANet (wall / cpu) | vs resnet50 (wall / cpu) |',
        '|---|---:|---:|---:|',
    ]
    for spec in specs:
        t = results[spec]
        ips = case.batch_size / statistics.median(t.wall)
        cols = []
        for other in (reference_spec(spec, specs), 'resnet50' if 'resnet50' in specs else None):
            if other is None:
                cols.append('-')
            else:
                o = results[other]
                cols.append(f'{_median_ratio(t.wall, o.wall):.2f}x / {_median_ratio(t.cpu, o.cpu):.2f}x')
        rows.append(f'| {spec} | {ips:.2f} | {cols[0]} | {cols[1]} |')
    return '\n'.join(rows)


def _training_setup(spec: str, batch_size: int, img_size: int, fmt: str, device: torch.device) -> Callable[[], None]:
    """A training step (forward, cross-entropy, backward, SGD with momentum) of a freshly built model."""
    model = create(spec, device).to(memory_format=FORMATS[fmt]).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device).contiguous(memory_format=FORMATS[fmt])
    target = torch.randint(0, 1000, (batch_size,), device=device)

    def step() -> None:
        loss = F.cross_entropy(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def training_peak_memory(spec: str, batch_size: int, img_size: int, fmt: str, device: torch.device) -> float:
    """Peak memory (MiB) added by two training steps of one model, over what the built model holds.

    On CPU: the process's peak resident set during the steps (reset first through /proc/self/clear_refs)
    minus its resident set before them; best run in a fresh process, as :func:`memory_in_subprocess` does.
    It includes what the C allocator keeps of freed blocks, so it varies by tens of MiB from run to run.
    On CUDA: the peak of allocated device memory minus the memory allocated before the steps.
    """
    step = _training_setup(spec, batch_size, img_size, fmt, device)
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


def training_peak_tensor_memory(spec: str, batch_size: int, img_size: int, fmt: str) -> Optional[float]:
    """Peak of live CPU tensor memory (MiB) during the second training step of one model, or None.

    Read from ``torch.profiler``'s memory timeline, which follows every tensor allocation and free: unlike
    the resident set it does not depend on how the C allocator keeps and reuses freed blocks, so two
    models that hold the same tensors read the same. None where this torch cannot export the timeline.
    """
    step = _training_setup(spec, batch_size, img_size, fmt, torch.device('cpu'))
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
    spec: str, batch_size: int, img_size: int, fmt: str, device: str, threads: int
) -> Dict[str, Optional[float]]:
    """Training-step memory of one model measured in a fresh interpreter, so that no other model counts.

    Returns ``{'rss': ..., 'tensors': ...}`` in MiB: :func:`training_peak_memory` (peak resident set, or
    allocated CUDA memory) and, on CPU, :func:`training_peak_tensor_memory` (None elsewhere).
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
        '--device',
        device,
        '--threads',
        str(threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f'Memory probe of {spec} failed:\n{out.stderr[-2000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m timm_epsanet.benchmark',
        description='Interleaved throughput / training-memory benchmark of EPSANet vs reference and timm models.',
    )
    parser.add_argument('--models', default=DEFAULT_MODELS, help='comma-separated; NAME:reference = plain PSA')
    parser.add_argument('--modes', default='infer,train', help='comma-separated subset of infer,train')
    parser.add_argument('--batch-sizes', default='1,16', help='inference batch sizes')
    parser.add_argument('--train-batch-sizes', default='8', help='training-step batch sizes')
    parser.add_argument('--formats', default='nchw,cl', help='memory formats of model and input: nchw, cl')
    parser.add_argument('--channels-last', action='store_true', help='shorthand for --formats cl')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=3, help='interleaved rounds per measurement')
    parser.add_argument('--iters', type=int, default=0, help='steps per model per round (0: auto)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per model before the rounds')
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    parser.add_argument('--device', default='cpu', help='cpu or cuda[:N]')
    parser.add_argument('--amp', action='store_true', help='autocast (float16 on CUDA, bfloat16 on CPU)')
    parser.add_argument('--compile', action='store_true', help='torch.compile every model (slow first steps)')
    parser.add_argument('--memory', action=argparse.BooleanOptionalAction, default=True, help='training peak memory')
    parser.add_argument('--verbose', action='store_true', help='also report warm-up times')
    parser.add_argument('--memory-probe', default='', help=argparse.SUPPRESS)
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
    try:
        args.batch_list = [int(b) for b in args.batch_sizes.split(',') if b]
        args.train_batch_list = [int(b) for b in args.train_batch_sizes.split(',') if b]
    except ValueError:
        parser.error('--batch-sizes / --train-batch-sizes take comma-separated integers')
    if args.rounds < 1:
        parser.error('--rounds must be at least 1')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available to torch')
    if not args.memory_probe:
        for spec in args.model_list:
            try:
                parse_model_spec(spec)
            except ValueError as e:
                parser.error(str(e))
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Timings]]:
    """Run the benchmark and print its report; returns the raw timings per case."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_probe:
        probe = (args.memory_probe, args.train_batch_list[0], args.img_size, args.format_list[0])
        result = {
            'rss': training_peak_memory(*probe, device),
            'tensors': training_peak_tensor_memory(*probe) if device.type == 'cpu' else None,
        }
        print(json.dumps(result))
        return {}

    header = describe_machine(device)
    header.append(
        f'device {device}, image {args.img_size}px, {args.rounds} rounds, amp={args.amp}, compile={args.compile}; '
        'ratios are medians of per-round throughput ratios (wall / process CPU time)'
    )
    print('\n'.join(header), flush=True)

    runners = [Runner(spec, create(spec, device), args, device) for spec in args.model_list]
    cases = [
        Case(mode, b, fmt)
        for mode in args.mode_list
        for b in (args.batch_list if mode == 'infer' else args.train_batch_list)
        for fmt in args.format_list
    ]
    all_results = {}
    for case in cases:
        results = time_case(runners, case, args, device)
        all_results[str(case)] = results
        print('\n' + format_table(case, results, args.model_list), flush=True)

    if args.memory and 'train' in args.mode_list:
        print(
            '\n### training-step peak memory, MiB: live tensors (torch profiler) / process resident set '
            '(over the built model; fresh process per model)\n'
        )
        columns = [f'batch {b} {f}' for b in args.train_batch_list for f in args.format_list]
        print('| model | ' + ' | '.join(columns) + ' |')
        print('|---|' + '---:|' * (len(args.train_batch_list) * len(args.format_list)))
        for spec in args.model_list:
            cells = []
            for b in args.train_batch_list:
                for f in args.format_list:
                    print(f'[memory] {spec} batch {b} {f}', file=sys.stderr, flush=True)
                    mem = memory_in_subprocess(spec, b, args.img_size, f, args.device, torch.get_num_threads())
                    tensors = 'n/a' if mem['tensors'] is None else f'{mem["tensors"]:.0f}'
                    cells.append(f'{tensors} / {mem["rss"]:.0f}')
            print(f'| {spec} | ' + ' | '.join(cells) + ' |', flush=True)
    return all_results


if __name__ == '__main__':
    main()
