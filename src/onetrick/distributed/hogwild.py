"""Hogwild: asynchronous data parallelism in shared memory (docs/PAPER.md form 3).

K worker processes on one machine (torch.multiprocessing, spawn) update one set of
weights held in shared memory (``model.share_memory()``), without locks. Each worker
reads its own shard of every epoch (:class:`DataShard`: data rank = worker index, data
world = K), keeps its own momentum, and applies its SGD step of batch B straight into
the shared tensors, so updates from different workers may interleave inside a tensor:
Hogwild's bet is that such conflicts cost less than any synchronisation. Each update is
one worker's batch, so the learning rate is not scaled with K (:func:`local_config`).
Asynchrony acts as extra momentum (Mitliagkas et al. 2016, "Asynchrony begets
momentum"): on top of the recipe's 0.9, K=2 runs of the small network on digits often
stall at chance, while ``--momentum 0.5`` trains them as well as synchronous SGD (the
same holds for the parameter server). Nothing crosses a network: bytes per step are 0.

This module holds the shared-memory mechanics; the processes, their loop and the run
directory are run/hogwild.py's. Each worker's momentum buffers live in shared memory
too (the parent allocates them and the worker's SGD updates them in place), next to a
shared table of every worker's counters (steps done, images, skipped steps) and a pause
handshake: :class:`Board`. With it the parent can checkpoint a consistent cut: worker 0
asks for it, every live worker pauses at its next step boundary (a worker that finished
or died counts as paused, with its state as it left it), the parent saves, then
releases them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from onetrick.config import TrainConfig

PAUSE_S = 0.002       # how often a paused worker looks whether the checkpoint is written
STEPS, IMAGES, SKIPPED, PAUSED, DONE = range(5)   # columns of the shared counters table


@dataclass
class DataShard:
    """Which part of every epoch one asynchronous worker reads: the two things
    ``train_batches`` asks of a strategy."""

    data_rank: int
    data_world: int


def local_config(cfg: TrainConfig) -> TrainConfig:
    """The configuration of one asynchronous worker's own learner: a single process whose
    every update is its own batch B (no K-times batch, so no lr scaling) and which
    evaluates the whole test set alone."""
    return cfg.replace(strategy="single", workers=1)


class Board:
    """What Hogwild's parent and workers share besides the weights: each worker's
    momentum buffers, a table of counters (one row per worker) and the checkpoint
    handshake ``control = [requested, released]`` (checkpoint generations)."""

    def __init__(self, model: torch.nn.Module, workers: int) -> None:
        self.momentum = [{n: torch.zeros_like(p).share_memory_() for n, p in model.named_parameters()}
                         for _ in range(workers)]
        self.counters = torch.zeros(workers, 5, dtype=torch.int64).share_memory_()
        self.control = torch.zeros(2, dtype=torch.int64).share_memory_()

    def state(self, model: torch.nn.Module) -> dict:
        """A checkpoint's DCP state: the shared weights and every worker's momentum."""
        return {"model": model.state_dict(), "momentum": {f"worker{i}": m for i, m in enumerate(self.momentum)}}

    def ranks(self) -> list[dict]:
        """Every worker's counters, as meta.json's ``ranks`` holds them."""
        return [{"steps": int(r[STEPS]), "images": int(r[IMAGES]), "skipped_steps": int(r[SKIPPED])}
                for r in self.counters]

    def restore(self, ranks: list[dict]) -> None:
        for row, saved in zip(self.counters, ranks):
            row[STEPS], row[IMAGES], row[SKIPPED] = saved["steps"], saved["images"], saved["skipped_steps"]

    def publish(self, index: int, steps: int, images: int, skipped: int) -> None:
        """A worker, after each step: what a checkpoint taken now records for it."""
        row = self.counters[index]
        row[IMAGES], row[SKIPPED], row[STEPS] = images, skipped, steps

    def finished(self, index: int) -> None:
        """A worker that returns (or fails to start): no checkpoint need wait for it any more."""
        self.counters[index, DONE] = 1

    def request(self) -> None:
        """Worker 0: ask for a checkpoint at this step boundary."""
        self.control[0] += 1

    def pause_if_asked(self, index: int) -> None:
        """A worker at a step boundary: if a checkpoint is asked for, wait until it is written."""
        wanted = int(self.control[0])
        if wanted <= int(self.control[1]):
            return
        self.counters[index, PAUSED] = wanted
        while int(self.control[1]) < wanted:
            time.sleep(PAUSE_S)

    def ready(self, procs: list) -> bool:
        """The parent: a checkpoint is asked for, and every worker has paused, finished or died."""
        wanted = int(self.control[0])
        if wanted <= int(self.control[1]):
            return False
        return all(int(row[PAUSED]) == wanted or bool(row[DONE]) or p.exitcode is not None
                   for row, p in zip(self.counters, procs))

    def release(self) -> None:
        self.control[1] = self.control[0]

    def lead_steps(self) -> int:
        """Worker 0's steps done: what a checkpoint taken now is named by."""
        return int(self.counters[0, STEPS])
