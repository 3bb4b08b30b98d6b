"""Your own training loop, parallelised by onetrick, run by torchrun.

    torchrun --standalone --nproc-per-node 2 examples/own_loop.py --steps 20
    python examples/own_loop.py --batch 32        # one worker: the same SGD, batch 2 x 16

Each worker builds the same plain model, ``onetrick.parallelize`` joins torchrun's
process group and applies the hybrid (data-parallel trunk, neuron-sharded head), and the
loop calls the strategy's step API. Worker r reads rows [r*B, (r+1)*B) of each global
batch of K*B, so K workers at batch B equal one worker at batch K*B (tests/integration/test_api.py checks it).
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import onetrick


def make_model(classes: int = 10) -> nn.Module:
    """A plain CNN: nn.Sequential, the head starting at child "4"."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, classes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="per worker")
    parser.add_argument("--save", default=None, help="write the final unsharded weights here (worker 0)")
    args = parser.parse_args()

    strategy = onetrick.parallelize(make_model(), "hybrid", head="4", lr=0.05, scheme="b", dropout=0.0)
    k, rank = strategy.data_world, strategy.data_rank
    g = torch.Generator().manual_seed(1)  # every worker draws the same global batches
    strategy.set_training(True)
    for step in range(args.steps):
        images = torch.randn(k * args.batch, 3, 16, 16, generator=g)
        labels = torch.randint(0, 10, (k * args.batch,), generator=g)
        mine = slice(rank * args.batch, (rank + 1) * args.batch)
        out = strategy.train_step(images[mine], labels[mine])  # forward, backward, communication, update
        if strategy.rt.is_main and (step + 1) % 5 == 0:
            print(f"step {step + 1}: loss {out.loss:.4f} over {out.count} examples")
    state = strategy.full_state_dict()  # collective: every worker calls it
    if args.save and strategy.rt.is_main:
        torch.save(state, args.save)


if __name__ == "__main__":
    main()
