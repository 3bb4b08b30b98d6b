"""Collectives per training step of the hybrid, by tag/op, for schemes a/b/c at K workers.

Usage: PYTHONPATH=src python scripts/count_collectives.py [K ...]   (default: 2 4 8)

A tiny model (2 convs, a 3-Linear 50-30-5 head) on random data, gloo on CPU; the counts
do not depend on the model's size, only on its number of Linear layers and trunk buckets.
"""
from __future__ import annotations

import json
import sys

import torch
from torch import nn

from onetrick.config import TrainConfig
from onetrick.distributed import parallelize
from onetrick.distributed.runtime import launch
from onetrick.models import TrunkHeadNet, fc_head

RUNS = [dict(scheme="a"), dict(scheme="b"), dict(scheme="c"),
        dict(scheme="b", fc_batch="worker"), dict(scheme="c", fc_batch="worker")]


def _model() -> TrunkHeadNet:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    return TrunkHeadNet(trunk, fc_head(8 * 8 * 8, (50, 30), 5, dropout=0.0))


def _count(rt, cfg: TrainConfig, b: int) -> dict:
    out = {}
    for changes in RUNS:
        strategy = parallelize(_model(), cfg.replace(strategy="hybrid", **changes), rt)
        g = torch.Generator().manual_seed(rt.rank)
        strategy.comm.take()
        for _ in range(2):  # the second step is the steady state
            strategy.train_step(torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 5, (b,), generator=g))
            counts = strategy.comm.take()
        out["/".join(f"{v}" for v in changes.values())] = {"total": counts["calls_total"], "calls": counts["calls"]}
    return out


def main(ks: list[int]) -> None:
    for k in ks:
        cfg = TrainConfig(lr=0.05, dropout=0.0, threads=1, timeout_s=120, workers=k)
        result = launch(_count, cfg, 8 * k, nprocs=k)[0]
        for run, c in result.items():
            print(json.dumps({"K": k, "run": run, **c}))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [2, 4, 8])
