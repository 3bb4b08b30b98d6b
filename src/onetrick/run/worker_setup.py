"""What every training process starts from, synchronous or asynchronous: the data, the
parallelised model with the same initial weights everywhere, and the batches of each step."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from onetrick.config import TrainConfig
from onetrick.data import DataBundle, DataError, build_data
from onetrick.distributed import parallelize
from onetrick.distributed.runtime import Runtime
from onetrick.distributed.strategy import Strategy
from onetrick.models import build_model, input_size
from onetrick.run.source import Source


def setup(rt: Runtime, cfg: TrainConfig, source: Source | None = None) -> tuple[DataBundle, Strategy]:
    """Data and the parallelised model; identical initial weights on every worker.
    ``source`` (from :func:`onetrick.fit`) replaces ``cfg.model`` and ``cfg.data``."""
    if source is not None:
        data, model = source.build()
        return data, parallelize(model, cfg, rt)
    data = run_data(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels, dropout=cfg.dropout)
    return data, parallelize(model, cfg, rt)


def run_data(cfg: TrainConfig) -> DataBundle:
    """The data set ``--data`` names, as every process of the run builds it (the launcher's
    checks and planner too, so they see exactly what the workers will)."""
    data = build_data(cfg.data, image_size=cfg.image_size or input_size(cfg.model), seed=cfg.seed,
                      skip_corrupt=cfg.skip_corrupt, train_examples=cfg.train_examples, classes=cfg.classes)
    if cfg.classes is not None and cfg.classes < data.num_classes:
        raise DataError(f"--classes {cfg.classes} is fewer than the {data.num_classes} classes of {data.name}")
    return data if cfg.classes is None else dataclasses.replace(data, num_classes=cfg.classes)


def steps_per_epoch(data: DataBundle, cfg: TrainConfig) -> int:
    return steps_per_epoch_of(len(data.train), cfg)


def steps_per_epoch_of(train_examples: int, cfg: TrainConfig) -> int:
    """Global steps in one pass over ``train_examples`` (K*B examples a step)."""
    return max(1, train_examples // (cfg.batch * cfg.data_parallel_degree))


def total_steps(data: DataBundle, cfg: TrainConfig) -> int:
    return total_steps_of(len(data.train), cfg)


def total_steps_of(train_examples: int, cfg: TrainConfig) -> int:
    """``--steps``, or ``--epochs`` over ``train_examples`` in steps."""
    return cfg.steps or max(1, math.ceil(cfg.epochs * steps_per_epoch_of(train_examples, cfg)))


def train_batches(data: DataBundle, cfg: TrainConfig, strategy, start_step: int) -> Iterator:
    """Yield ``(epoch, images, targets)`` from ``start_step`` on.

    ``strategy``: anything with ``data_rank`` and ``data_world``. Epoch e is a permutation
    seeded by (seed, e); worker r of K reads every K-th example of it, so the K*B examples
    of global step i are those one worker of batch K*B reads (the equivalence the tests
    rely on). Resuming skips consumed batches by index.
    """
    per_epoch = steps_per_epoch(data, cfg)
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler = DistributedSampler(data.train, num_replicas=strategy.data_world, rank=strategy.data_rank,
                                     shuffle=True, seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
        indices = list(sampler)[skip * cfg.batch:per_epoch * cfg.batch]
        loader = DataLoader(data.train, batch_size=cfg.batch, sampler=indices, drop_last=True,
                            num_workers=data.loader_workers, persistent_workers=False,
                            generator=torch.Generator().manual_seed(cfg.seed + epoch),
                            pin_memory=cfg.device == "cuda")
        if len(loader) == 0 and skip == 0:  # never wait forever for a batch that cannot come
            raise DataError(f"{data.name}: this worker's share of an epoch holds no batch of {cfg.batch}")
        for images, targets in loader:
            yield epoch, images, targets
        epoch, skip = epoch + 1, 0
