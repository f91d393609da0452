"""``python -m timm_epsanet.benchmark``: the CLI runs, prints ratios, refuses bad arguments, probes memory; its
precisions, the GPU target table and the CUDA plumbing.

No GPU here: the CUDA timing and memory code is driven through stand-ins for CUDA events and ``torch.cuda``,
and the timing loop through a fake clock; nothing asserts a real timing. One tiny CPU run (32 px) covers the
precision cases and the target report end to end. Cost: about 30 s on 2 busy cores, mostly the two CLI runs
and the memory probe.
"""

import argparse
import json
import math
import subprocess
from types import SimpleNamespace

import pytest
import torch

import timm_epsanet.benchmark as bench
from timm_epsanet.benchmark import Case, Timings
from timm_epsanet.ops import psa_cuda


def test_benchmark_cli_smoke(capsys):
    """Tiny run of ``python -m timm_epsanet.benchmark``: tables with ratios, progress on stderr."""
    results = bench.main(
        [
            '--models',
            'epsanet50,epsanet50:reference',
            '--modes',
            'infer,train',
            '--batch-sizes',
            '1',
            '--train-batch-sizes',
            '2',
            '--formats',
            'nchw',
            '--img-size',
            '32',
            '--rounds',
            '1',
            '--warmup',
            '0',
            '--no-memory',
            '--threads',
            '1',  # two threads on two busy cores made this test 10x slower
        ]
    )
    out, err = capsys.readouterr()
    assert 'CPU:' in out and 'torch threads' in out
    assert '### infer batch 1 nchw' in out and '### train batch 2 nchw' in out
    assert '| epsanet50:reference |' in out and '1.00x / 1.00x' in out
    assert 'round 1/1' in err
    timings = results['train batch 2 nchw']['epsanet50']
    assert len(timings.wall) == 1 and timings.wall[0] > 0


def test_benchmark_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench.main(['--models', 'resnet50:reference'])
    assert 'only EPSANet models' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(['--formats', 'nhwc'])
    assert "unknown format 'nhwc'" in capsys.readouterr().err


def test_training_peak_memory_probe():
    """The probe as the benchmark runs it: in a fresh interpreter, where the steps' activations must show."""
    mem = bench.memory_in_subprocess('epsanet50', 2, 32, 'nchw', 'cpu', 1)
    assert math.isfinite(mem['rss']) and mem['rss'] > 0
    # The step's tensors at least hold the parameters' gradients (epsanet50: 22.6M float32 values).
    assert mem['tensors'] > 22.5e6 * 4 / 2**20


def test_help_shows_defaults_and_exits_0(capsys, monkeypatch):
    monkeypatch.setenv('COLUMNS', '250')  # argparse wraps help to the terminal width
    with pytest.raises(SystemExit) as e:
        bench.main(['--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('usage: python -m timm_epsanet.benchmark')
    assert '(default: 224)' in out and '(default: epsanet50,epsanet50:reference,resnet50,' in out
    assert '--amp-dtype' in out and '--gpu-targets' in out


def test_unknown_option_exits_2_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(['--no-such-option'])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('usage: ') and 'unrecognized arguments: --no-such-option' in err


def test_precisions_from_amp_and_amp_dtype(capsys):
    assert bench.parse_args([]).precision_list == ['float32']
    assert bench.parse_args(['--amp']).precision_list == ['bfloat16']  # CPU autocast dtype, as before
    assert bench.parse_args(['--amp-dtype', 'bf16,float16,fp32,bfloat16']).precision_list == [
        'bfloat16',
        'float16',
        'float32',
    ]
    assert bench.parse_args(['--amp', '--amp-dtype', 'float16']).precision_list == ['float16']
    with pytest.raises(SystemExit) as e:
        bench.parse_args(['--amp-dtype', 'int8'])
    assert e.value.code == 2 and "unknown precision 'int8'" in capsys.readouterr().err


def test_case_names_keep_float32_unmarked():
    assert str(Case('infer', 256, 'cl')) == 'infer batch 256 cl'
    assert str(Case('train', 128, 'cl', 'bfloat16')) == 'train batch 128 cl bfloat16'


def test_gpu_targets_preset_fills_only_what_is_not_given(capsys):
    args = bench.parse_args(['--gpu-targets', '--device', 'cpu', '--batch-sizes', '2'])
    assert args.model_list == ['epsanet50', 'epsanet50:reference', 'resnet50']
    assert args.format_list == ['cl'] and args.img_size == 224 and args.mode_list == ['infer', 'train']
    assert args.batch_list == [2] and args.train_batch_list == [128]  # the explicit batch size wins
    assert args.precision_list == ['bfloat16', 'float16', 'float32'] and args.device == 'cpu'
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            bench.parse_args(['--gpu-targets'])
        assert e.value.code == 2 and 'no CUDA device' in capsys.readouterr().err


def test_triton_spec_passes_psa_impl_through(monkeypatch):
    assert bench.parse_model_spec('epsanet50:triton') == {'name': 'epsanet50', 'kwargs': {'psa_impl': 'triton'}}
    with pytest.raises(ValueError, match='must be one of fast, reference, triton'):
        bench.parse_model_spec('epsanet50:cuda')
    built = []
    monkeypatch.setattr(bench.timm, 'create_model', lambda name, **kw: built.append((name, kw)) or torch.nn.Identity())
    bench.create('epsanet50:triton', torch.device('cpu'))
    assert built == [('epsanet50', {'psa_impl': 'triton'})]


def test_triton_spec_refused_with_the_reason_where_it_cannot_run(monkeypatch, capsys):
    monkeypatch.setattr(bench, 'triton_unavailable_reason', lambda device: f'no GPU ({device})')
    with pytest.raises(SystemExit) as e:
        bench.parse_args(['--models', 'epsanet50:triton,resnet50'])
    assert e.value.code == 2
    assert "'epsanet50:triton': Triton PSA kernels cannot run here: no GPU (cpu)" in capsys.readouterr().err
    monkeypatch.setattr(bench, 'triton_unavailable_reason', lambda device: None)
    assert bench.parse_args(['--models', 'epsanet50:triton']).model_list == ['epsanet50:triton']


def test_triton_unavailable_reason_on_cpu(monkeypatch):
    """Without a GPU (and without the interpreter) the Triton path always has a reason not to run."""
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    if torch.cuda.is_available():
        pytest.skip('a GPU is present')
    reason = bench.triton_unavailable_reason(torch.device('cpu'))
    assert isinstance(reason, str) and reason


class FakeEvent:
    """Stands in for torch.cuda.Event: records the time of a fake GPU clock."""

    gpu_ms = 0.0

    def __init__(self, enable_timing):
        assert enable_timing
        self.t = None

    def record(self):
        self.t = FakeEvent.gpu_ms

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return end.t - self.t


def test_cuda_event_clock_times_the_gpu_and_waits_first():
    log = []
    cpu = iter([1.0, 1.25])
    clock = bench.CudaEventClock(
        torch.device('cuda:0'), event_factory=FakeEvent, synchronize=log.append, cpu=lambda: next(cpu)
    )
    FakeEvent.gpu_ms = 100.0
    clock.start()
    assert log == [torch.device('cuda:0')]  # idle GPU before the first event
    FakeEvent.gpu_ms += 40.0  # 40 ms of queued work
    assert clock.stop() == (pytest.approx(0.040), pytest.approx(0.25))
    assert isinstance(bench.make_clock(torch.device('cuda')), bench.CudaEventClock)
    assert isinstance(bench.make_clock(torch.device('cpu')), bench.HostClock)


def test_gpu_description_names_card_and_switches(monkeypatch):
    props = SimpleNamespace(name='NVIDIA H100 80GB HBM3', major=9, minor=0, total_memory=80 * 2**30)
    monkeypatch.setattr(torch.cuda, 'get_device_properties', lambda device: props)
    monkeypatch.setattr(torch.backends.cudnn, 'version', lambda: 91900)
    lines = bench.describe_gpu(torch.device('cuda'))
    assert lines[0].startswith('GPU: NVIDIA H100 80GB HBM3 (sm_90, 80 GiB), CUDA ') and 'cuDNN 91900' in lines[0]
    assert 'cudnn.benchmark=' in lines[1] and 'TF32: cuDNN ' in lines[1]


def test_cuda_peak_memory_reads_the_allocator_statistics():
    log = []

    class FakeCuda:
        def synchronize(self, device):
            log.append('sync')

        def memory_allocated(self, device):
            log.append('allocated')
            return 2**29

        def reset_peak_memory_stats(self, device):
            log.append('reset')

        def max_memory_allocated(self, device):
            log.append('max')
            return 3 * 2**30

    meter = bench.CudaPeakMemory(torch.device('cuda:0'), cuda=FakeCuda())
    assert meter.allocated_mib() == 512
    meter.start()
    assert meter.peak_mib() == 3 * 1024
    assert log == ['sync', 'allocated', 'sync', 'reset', 'sync', 'max']


def test_training_peak_cuda_memory_counts_one_model_after_its_first_step(monkeypatch):
    """Counted from before the model is built; the first step (autotuning, the PSA choice) is left out."""
    log = []

    def setup(*args):
        log.append('build')
        return lambda: log.append('step')

    monkeypatch.setattr(bench, '_training_setup', setup)

    class Meter:
        def __init__(self, device):
            pass

        def allocated_mib(self):
            log.append('base')
            return 100.0

        def start(self):
            log.append('reset')

        def peak_mib(self):
            log.append('peak')
            return 1123.0

    monkeypatch.setattr(bench, 'CudaPeakMemory', Meter)
    assert bench.training_peak_cuda_memory('epsanet50', 2, 32, 'cl', torch.device('cuda'), 'bfloat16') == 1023.0
    assert log == ['base', 'build', 'step', 'reset', 'step', 'step', 'peak']


def test_memory_probe_runs_with_the_case_precision_and_settings(monkeypatch):
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, json.dumps({'rss': None, 'tensors': None, 'cuda': 5.0}), '')

    monkeypatch.setattr(bench.subprocess, 'run', fake_run)
    mem = bench.memory_in_subprocess('epsanet50', 128, 224, 'cl', 'cuda', 4, 'bfloat16', ['--no-tf32'])
    assert mem['cuda'] == 5.0
    cmd = seen[0]
    assert cmd[cmd.index('--amp-dtype') + 1] == 'bfloat16' and cmd[-1] == '--no-tf32'


class FakeRunner:
    def __init__(self, spec, log):
        self.spec, self.log = spec, log

    def prepare(self, case):
        self.log.append(('prepare', self.spec))

    def step(self, case, x, target):
        self.log.append(('step', self.spec))


class FakeClock:
    def start(self):
        pass

    def stop(self):
        return 0.5, 0.25


def test_time_case_uses_the_device_clock_and_default_warmup(monkeypatch):
    monkeypatch.setattr(bench, 'make_clock', lambda device: FakeClock())
    log = []
    runners = [FakeRunner('a', log), FakeRunner('b', log)]
    args = argparse.Namespace(iters=2, warmup=-1, rounds=2, img_size=8, verbose=False)
    results = bench.time_case(runners, Case('train', 2, 'nchw'), args, torch.device('cpu'))
    assert results['a'].wall == [0.25, 0.25] and results['b'].cpu == [0.125, 0.125]
    steps = [spec for what, spec in log if what == 'step']
    # 2 warm-up steps each (the CPU default), then round 1 in order and round 2 reversed, 2 steps each.
    assert steps == ['a'] * 2 + ['b'] * 2 + ['a'] * 2 + ['b'] * 2 + ['b'] * 2 + ['a'] * 2
    assert bench.default_warmup(torch.device('cuda')) > bench.default_warmup(torch.device('cpu'))


def _timings(seconds):
    return Timings(wall=list(seconds), cpu=list(seconds))


def test_gpu_table_gives_gpu_time_ratios_only():
    results = {'epsanet50': _timings([1.0]), 'epsanet50:reference': _timings([2.0]), 'resnet50': _timings([0.5])}
    table = bench.format_table(Case('infer', 256, 'cl', 'bfloat16'), results, list(results), gpu=True)
    assert '### infer batch 256 cl bfloat16' in table and 'vs resnet50 (GPU time)' in table
    assert '| epsanet50 | 256.00 | 2.00x | 0.50x |' in table


def test_target_report_marks_each_target():
    specs = ['epsanet50', 'epsanet50:reference', 'resnet50']

    def case_results(fast, ref, resnet):
        return {'epsanet50': _timings(fast), 'epsanet50:reference': _timings(ref), 'resnet50': _timings(resnet)}

    results = {
        # bf16 inference: 1.6x the reference, 0.4x resnet50 (per-round ratios 1.6, 1.6, 1.6 and 0.4).
        Case('infer', 256, 'cl', 'bfloat16'): case_results([1.0, 2.0, 1.0], [1.6, 3.2, 1.6], [0.4, 0.8, 0.4]),
        # fp16 inference at 1 / 1.05 of bf16's median throughput: within 10%.
        Case('infer', 256, 'cl', 'float16'): case_results([1.05], [1.0], [1.0]),
        Case('train', 128, 'cl', 'float32'): case_results([1.0], [1.2], [1.0]),
    }
    memory = {
        ('epsanet50', 128, 'cl', 'float32'): {'cuda': 900.0},
        ('epsanet50:reference', 128, 'cl', 'float32'): {'cuda': 1000.0},
    }
    rows = bench.target_report(results, specs, memory).splitlines()
    assert '| epsanet50 | infer batch 256 cl bfloat16 | >= 1.5x epsanet50:reference | 1.60x | yes |' in rows
    assert '| epsanet50 | infer batch 256 cl bfloat16 | >= 0.5x resnet50 | 0.40x | NO |' in rows
    assert '| epsanet50 | infer batch 256 cl float16 | >= 0.9x its bfloat16 speed | 0.95x | yes |' in rows
    assert '| epsanet50 | train batch 128 cl | >= 1.3x epsanet50:reference | 1.20x | NO |' in rows
    assert (
        '| epsanet50 | train batch 128 cl | peak memory <= epsanet50:reference (1000 MiB) | 900 MiB | yes |'
    ) in rows
    assert not any(row.startswith('| epsanet50:reference |') or row.startswith('| resnet50 |') for row in rows)
    assert len(rows) == 2 + 5


def test_gpu_targets_run_end_to_end_on_cpu(capsys):
    """The target table's flow at toy size on CPU: precision cases, chosen implementations, target report."""
    psa_cuda.clear_choices()
    psa_cuda.choose('toy shape', {'cudnn_grouped': abs}, (1,), timer=lambda fn, args, training: 1e-3)
    try:
        args = ['--gpu-targets', '--device', 'cpu', '--models', 'epsanet50,epsanet50:reference']
        args += ['--img-size', '32', '--batch-sizes', '1', '--train-batch-sizes', '2', '--amp-dtype', 'bf16,fp32']
        args += ['--rounds', '1', '--warmup', '0', '--no-memory', '--threads', '1']
        results = bench.main(args)
    finally:
        psa_cuda.clear_choices()
    out = capsys.readouterr().out
    assert set(results) == {
        'infer batch 1 cl bfloat16',
        'train batch 2 cl bfloat16',
        'infer batch 1 cl',
        'train batch 2 cl',
    }
    assert 'precision bfloat16,float32' in out
    assert '| toy shape | cudnn_grouped | 1.000 |' in out
    assert '### issue 11 targets' in out
    assert '| epsanet50 | train batch 2 cl bfloat16 | >= 1.5x epsanet50:reference |' in out
    assert '| epsanet50 | infer batch 1 cl | >= 1.3x epsanet50:reference |' in out
