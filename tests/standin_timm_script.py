"""Stand-in for a timm script (train.py & co.), for testing ``python -m timm_epsanet.run``.

timm's scripts are not on PyPI, so the tests run this instead. Like them, it imports only timm, parses
its arguments, creates the model by name, runs one training step and, under ``torchrun``, joins the
process group from the environment. It prints one ``RESULT {json}`` line per process.
"""

import argparse
import json
import os
import sys

import timm
import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser(description='timm script stand-in')
    parser.add_argument('--model', required=True)
    parser.add_argument('--num-classes', type=int, default=10)
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('-b', '--batch-size', type=int, default=2)
    parser.add_argument('--lr', type=float, default=0.1)
    args = parser.parse_args()

    torch.set_num_threads(1)
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size > 1:
        dist.init_process_group('gloo')
    rank = dist.get_rank() if dist.is_initialized() else 0

    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=args.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    target = torch.arange(args.batch_size) % args.num_classes
    loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    optimizer.step()

    result = dict(
        argv=sys.argv,
        name=__name__,
        rank=rank,
        world_size=world_size,
        model=type(model).__name__,
        architecture=model.pretrained_cfg['architecture'],
        params=sum(p.numel() for p in model.parameters()),
        loss=loss.item(),
    )
    print('RESULT ' + json.dumps(result), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
