"""Distributed data-parallel training of EPSANet with torch.distributed (2 processes, gloo, 127.0.0.1).

timm's train.py cannot run DDP on CPU (it passes ``device_ids`` for a CPU module), so the distributed
path is proven here with the pieces train.py uses: ``DistributedDataParallel``, timm's
``convert_sync_batchnorm`` (``--sync-bn``) and timm's ``distribute_bn`` (``--dist-bn reduce``).

Each rank trains epsanet50 on its own data for a few SGD steps. Afterwards the model must be identical
on both ranks, every parameter must have moved (an unused parameter would also make DDP raise on the
next step), and the parameters must equal (bit for bit here) one process that steps a replica per rank
with the average of the replicas' gradients, which is what DDP promises.

PyTorch's SyncBatchNorm has no CPU kernel (it refuses CPU input in training), so on CPU the ranks
normalise with their own batch statistics, as train.py without ``--sync-bn`` does; the converted model
is checked on CPU for weights and outputs, and trained with SyncBatchNorm only where a GPU exists.
About 30-60 s on 2 cores (two processes that import torch and timm, 3 steps at 64x64).
"""

import socket
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from timm.layers import convert_sync_batchnorm
from timm.utils import distribute_bn
from torch.nn.parallel import DistributedDataParallel

import timm_epsanet  # noqa: F401  (registers the models, also in the spawned processes)

WORLD_SIZE = 2
STEPS = 3
BATCH = 2
IMG_SIZE = 64
NUM_CLASSES = 10
SGD = dict(lr=0.05, momentum=0.9, weight_decay=1e-4)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model('epsanet50', num_classes=NUM_CLASSES)


def _batch(rank: int, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Different data for every rank and step, the same in every process."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, 3, IMG_SIZE, IMG_SIZE, generator=g), torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)


def _worker(rank: int, port: int, out_dir: str, device_type: str, sync_bn: bool) -> None:
    torch.set_num_threads(1)  # two processes share the machine's cores
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD_SIZE)
    try:
        device = torch.device(device_type)
        model = _model()
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        if sync_bn:
            model = convert_sync_batchnorm(model)
        model.to(device)
        ddp = DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)
        optimizer = torch.optim.SGD(ddp.parameters(), **SGD)
        for step in range(STEPS):
            x, y = (t.to(device) for t in _batch(rank, step))
            loss = F.cross_entropy(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        local = {k: v.cpu().clone() for k, v in model.state_dict().items()}
        if not sync_bn:
            distribute_bn(model, WORLD_SIZE, reduce=True)  # train.py --dist-bn reduce
        final = {k: v.cpu() for k, v in model.state_dict().items()}
        params = [name for name, _ in model.named_parameters()]
        torch.save(dict(initial=initial, local=local, final=final, params=params), Path(out_dir) / f'rank{rank}.pt')
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _reference() -> Dict[str, torch.Tensor]:
    """DDP's promise computed in one process: one replica per rank, each taking the gradient of its own
    batch, every replica stepping with the average of those gradients."""
    # The ranks' kernels: CPU convolutions sum in a thread-dependent order, and a freshly initialised
    # network on tiny batches amplifies that rounding noise far beyond any useful tolerance.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_reference()
    finally:
        torch.set_num_threads(threads)


def _train_reference() -> Dict[str, torch.Tensor]:
    replicas = [_model() for _ in range(WORLD_SIZE)]
    optimizers = [torch.optim.SGD(m.parameters(), **SGD) for m in replicas]
    for step in range(STEPS):
        for rank, model in enumerate(replicas):
            x, y = _batch(rank, step)
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
        for params in zip(*(m.parameters() for m in replicas), strict=True):
            mean_grad = sum(p.grad / WORLD_SIZE for p in params)
            for p in params:
                p.grad = mean_grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    return replicas[0].state_dict()


def _run(tmp_path: Path, device_type: str, sync_bn: bool) -> List[dict]:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), device_type, sync_bn), nprocs=WORLD_SIZE, join=True)
    return [torch.load(tmp_path / f'rank{rank}.pt', weights_only=True) for rank in range(WORLD_SIZE)]


def _check_ranks(results: List[dict]) -> None:
    """Both ranks hold the same, trained model."""
    rank0, rank1 = results
    assert rank0['final'].keys() == rank1['final'].keys()
    for k, v in rank0['final'].items():
        assert torch.equal(v, rank1['final'][k]), f'{k} differs between the ranks'
    # epsanet50's parameter tensors: stem 3, 16 blocks x 16 (3 convs, 3 BNs, 4 PSA convs, SE 4), downsample 4 x 3, fc 2
    assert len(rank0['params']) == 3 + 16 * 16 + 4 * 3 + 2
    for name in rank0['params']:
        assert not torch.equal(rank0['final'][name], rank0['initial'][name]), f'{name} did not train'


def _running_stats(state: Dict[str, torch.Tensor]) -> List[str]:
    return [k for k in state if k.endswith(('running_mean', 'running_var'))]


def test_ddp_two_processes_cpu(tmp_path):
    results = _run(tmp_path, 'cpu', sync_bn=False)
    _check_ranks(results)
    reference = _reference()
    for name in results[0]['params']:
        torch.testing.assert_close(results[0]['final'][name], reference[name], rtol=1e-5, atol=1e-6)
    # Each rank's BatchNorm saw only its own data; distribute_bn then averaged the statistics.
    local0, local1 = results[0]['local'], results[1]['local']
    stats = _running_stats(local0)
    assert len(stats) == 2 * 53
    assert all(not torch.equal(local0[k], local1[k]) for k in stats)
    for k in stats:
        torch.testing.assert_close(results[0]['final'][k], (local0[k] + local1[k]) / 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='SyncBatchNorm has no CPU implementation in PyTorch')
def test_ddp_two_processes_sync_batchnorm_cuda(tmp_path):
    # Two processes on one GPU with gloo. Different data per rank, yet identical BatchNorm statistics on
    # both without distribute_bn: SyncBatchNorm normalised with the global batch's statistics.
    results = _run(tmp_path, 'cuda', sync_bn=True)
    _check_ranks(results)
    local0, local1 = results[0]['local'], results[1]['local']
    assert all(torch.equal(local0[k], local1[k]) for k in _running_stats(local0))


def test_convert_sync_batchnorm_keeps_weights_and_outputs():
    model = _model().eval()
    num_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x = _batch(0, 0)[0]
    with torch.no_grad():
        expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    synced = convert_sync_batchnorm(model)
    assert num_bn == 1 + 16 * 3 + 4  # stem, three per bottleneck, one per downsample
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == num_bn
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    synced_state = synced.state_dict()
    assert synced_state.keys() == state.keys()
    assert all(torch.equal(synced_state[k], v) for k, v in state.items())
    with torch.no_grad():
        torch.testing.assert_close(synced(x), expected, rtol=0, atol=0)  # eval: running statistics, no sync
