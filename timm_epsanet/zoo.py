"""The EPSANet model zoo: what each registered model is, costs and reaches, computed offline."""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from .epsanet import HUB_ORGANIZATION

# ImageNet-1k top-1 (224x224, single crop) as published by the authors (paper Table 2 / their README).
PAPER_TOP1: Dict[str, float] = {
    'epsanet50': 77.49,
    'epsanet101': 78.43,
    'epsanet50_large': 78.64,
    'epsanet101_large': 79.38,
}

# Hub repositories known to hold weights, by pretrained tag. Empty: nobody has published EPSANet
# ImageNet weights yet (the authors never released theirs). Add an entry when hub_upload.py pushes one.
PUBLISHED_WEIGHTS: Dict[str, str] = {}


@dataclass(frozen=True)
class ZooEntry:
    """One row of the model zoo."""

    name: str
    params: int
    gmacs: float
    feature_channels: Tuple[int, ...]
    paper_top1: Optional[float]
    hub_id: Optional[str]
    weights_published: bool


def count_macs(model: torch.nn.Module, input_size: Tuple[int, int, int] = (3, 224, 224)) -> int:
    """Multiply-accumulates of convolutions and linear layers for one image (the authors' count less BatchNorm)."""
    device = next(model.parameters()).device
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.empty((1, *input_size), device=device))
    return counter.get_total_flops() // 2


def zoo_entries(pattern: str = 'epsanet*') -> List[ZooEntry]:
    """Describe every registered model matching ``pattern``, without network or real memory (meta device)."""
    entries = []
    for name in timm.list_models(pattern):
        model = timm.create_model(name, device='meta').eval()
        params = sum(p.numel() for p in model.parameters())
        macs = count_macs(model)
        cfg = model.pretrained_cfg
        tag = f'{name}.{cfg["tag"]}' if cfg.get('tag') else name
        entries.append(
            ZooEntry(
                name=name,
                params=params,
                gmacs=macs / 1e9,
                feature_channels=tuple(info['num_chs'] for info in model.feature_info),
                paper_top1=PAPER_TOP1.get(name),
                hub_id=cfg.get('hf_hub_id'),
                weights_published=tag in PUBLISHED_WEIGHTS,
            )
        )
    return entries


def format_zoo(entries: List[ZooEntry]) -> str:
    """Render zoo entries as a Markdown table."""
    header = ['model', 'params (M)', 'GMACs @224', 'feature channels', 'paper top-1', 'Hub repo', 'weights']
    rows = [header, ['---'] * len(header)]
    for e in entries:
        rows.append(
            [
                e.name,
                f'{e.params / 1e6:.2f}',
                f'{e.gmacs:.2f}',
                '/'.join(str(c) for c in e.feature_channels),
                f'{e.paper_top1:.2f}' if e.paper_top1 is not None else '-',
                e.hub_id or '-',
                'published' if e.weights_published else 'not published',
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for r in rows:
        cells = [('-' * widths[i]) if r[i] == '---' else r[i].ljust(widths[i]) for i in range(len(r))]
        lines.append('| ' + ' | '.join(cells) + ' |')
    note = (
        f'Hub organisation: {HUB_ORGANIZATION}. GMACs count convolutions and linear layers; '
        "the paper's FLOPs also count BatchNorm (epsanet50 3.62, epsanet50_large 4.72, epsanet101 6.82, "
        'epsanet101_large 8.97 G).'
    )
    return '\n'.join(lines) + '\n\n' + note
