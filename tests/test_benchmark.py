"""``python -m timm_epsanet.benchmark``: the CLI runs, prints ratios, refuses bad arguments, probes memory."""

import math

import pytest

from timm_epsanet.benchmark import main as benchmark_main
from timm_epsanet.benchmark import memory_in_subprocess


def test_benchmark_cli_smoke(capsys):
    """Tiny run of ``python -m timm_epsanet.benchmark``: tables with ratios, progress on stderr."""
    results = benchmark_main(
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
        benchmark_main(['--models', 'resnet50:reference'])
    assert 'only EPSANet models' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark_main(['--formats', 'nhwc'])
    assert "unknown format 'nhwc'" in capsys.readouterr().err


def test_training_peak_memory_probe():
    """The probe as the benchmark runs it: in a fresh interpreter, where the steps' activations must show."""
    mem = memory_in_subprocess('epsanet50', 2, 32, 'nchw', 'cpu', 1)
    assert math.isfinite(mem['rss']) and mem['rss'] > 0
    # The step's tensors at least hold the parameters' gradients (epsanet50: 22.6M float32 values).
    assert mem['tensors'] > 22.5e6 * 4 / 2**20
