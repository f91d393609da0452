"""Deterministic stand-ins for the authors' EPSANet weights.

The recipe comes from ``tests/data/README.md`` (the golden-output fixtures were produced by the
authors' code loaded with exactly these weights): every tensor is a sine wave whose phase is derived
from the key's CRC32, so any implementation reproduces the values bit for bit without a random
generator.
"""

import json
import math
import zlib
from functools import cache
from pathlib import Path
from typing import Dict, List

import torch

DATA_DIR = Path(__file__).parent / 'data'
GOLDEN = {
    'epsanet50': DATA_DIR / 'epsanet50_golden.safetensors',
    'epsanet101': DATA_DIR / 'epsanet101_golden.safetensors',
}
_STEP = 0.7548776662466927


def official_keys(arch: str) -> Dict[str, List[int]]:
    """State dict keys and shapes of the authors' model, as they name them."""
    return json.loads((DATA_DIR / f'{arch}_keys.json').read_text())


def _wave(key: str, numel: int) -> torch.Tensor:
    phase = (zlib.crc32(key.encode()) % 10007) / 10007 * 2 * math.pi
    index = torch.arange(numel, dtype=torch.float64)
    return torch.sin(index * _STEP + phase)


def _is_norm_param(key: str) -> bool:
    return key.startswith('bn') or '.bn' in key or 'downsample.1' in key


def deterministic_tensor(key: str, shape: List[int]) -> torch.Tensor:
    """The recipe's value for one state dict entry."""
    numel = math.prod(shape)
    if key.endswith('num_batches_tracked'):
        return torch.zeros(shape, dtype=torch.int64)
    p = _wave(key, numel).reshape(shape)
    if key.endswith('running_var'):
        value = 1 + 0.5 * p.abs()
    elif key.endswith('running_mean'):
        value = 0.1 * p
    elif len(shape) == 1 and _is_norm_param(key) and key.endswith('weight'):
        value = (0.2 if '.bn3.' in key else 0.5) + 0.1 * p
    elif len(shape) == 1 and _is_norm_param(key) and key.endswith('bias'):
        value = 0.05 * p
    elif len(shape) == 1:
        value = 0.1 * p
    else:
        fan_in = math.prod(shape[1:])
        value = p * math.sqrt(2 / fan_in) * math.sqrt(2)
    return value.to(torch.float32)


@cache
def _cached_state_dict(arch: str) -> Dict[str, torch.Tensor]:
    return {k: deterministic_tensor(k, shape) for k, shape in official_keys(arch).items()}


def deterministic_state_dict(arch: str) -> Dict[str, torch.Tensor]:
    """The authors'-named state dict filled with the recipe's values (a new dict; the tensors are shared)."""
    return dict(_cached_state_dict(arch))


def golden_input() -> torch.Tensor:
    """The fixtures' input, 2x3x112x112."""
    index = torch.arange(2 * 3 * 112 * 112, dtype=torch.float64)
    return (2 * torch.sin(index * 0.37 + 0.5)).to(torch.float32).reshape(2, 3, 112, 112)


def authors_checkpoint(arch: str) -> dict:
    """What the authors' main.py would save for these weights (DataParallel prefix included)."""
    state_dict = deterministic_state_dict(arch)
    return {
        'epoch': 120,
        'arch': arch,
        'state_dict': {f'module.{k}': v for k, v in state_dict.items()},
        'best_prec1': torch.tensor(77.49),
        'optimizer': {'state': {}, 'param_groups': [{'lr': 0.0001, 'momentum': 0.9, 'params': [0]}]},
    }
