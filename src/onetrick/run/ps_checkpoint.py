"""The parameter server's checkpoints: one collective over every process (workers and
servers), at a consistent cut (see paramserver.py).

What each process saves (DCP): a server its shard of the weights and its flat momentum
(``server<s>/shard``, ``server<s>/momentum``); a worker its copy of the weights and its
unpushed accumulation (``worker<i>/weights``, ``worker<i>/accumulated``); rank 0 also the
whole model as the servers hold it (``model``, for eval/export/plot). meta.json's
``ranks`` has every process's counters (a worker's steps, images, skipped steps, the
versions it holds and its pushes; a server's version and staleness sums), ``totals`` the
attempts so far.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from onetrick.config import TrainConfig
from onetrick.data import DataBundle
from onetrick.distributed.data_parallel import _Bucket
from onetrick.distributed.hogwild import run_meta
from onetrick.distributed.runtime import Runtime
from onetrick.run import checkpoint
from onetrick.run.async_state import attempt_record

SHARDS, NOTICE = 5, 6   # message channels: a server's shard to rank 0; a checkpoint notice to a failed worker


class Checkpointer:
    """Every process holds one; :meth:`save` is collective."""

    def __init__(self, rt: Runtime, cfg: TrainConfig, data: DataBundle, model: torch.nn.Module, bucket: _Bucket,
                 role, prior: dict) -> None:
        self.rt, self.cfg, self.model, self.bucket, self.role, self.prior = rt, cfg, model, bucket, role, prior
        self.comm = role.comm
        self.weights = torch.zeros_like(bucket.flat)  # rank 0: the servers' weights, laid out as the bucket
        self.meta = run_meta(cfg, data)
        self.start = time.monotonic()

    def save(self, step: int) -> None:
        """Checkpoint ``step`` (every process calls it at the same cut)."""
        self._gather_weights()
        ranks: list = [None] * self.rt.world
        dist.all_gather_object(ranks, self.role.counters())
        state = self.role.state(self.rt.rank)
        if self.rt.rank == 0:
            state["model"] = self._model_state()
        meta = {**self.meta, "ranks": ranks, "totals": attempt_record(self.prior, self.start)}
        checkpoint.save(self.cfg.out, step, state, meta)

    def _gather_weights(self) -> None:
        workers, n = self.cfg.workers, self.bucket.shard_numel
        if self.rt.rank >= workers:
            self.comm.send(self.bucket.shard, 0, tag="checkpoint", channel=SHARDS)
        elif self.rt.rank == 0:
            for s in range(self.cfg.servers):
                self.comm.recv(self.weights[s * n:(s + 1) * n], workers + s, tag="checkpoint", channel=SHARDS)

    def _model_state(self) -> dict[str, torch.Tensor]:
        """The model's state_dict with the servers' weights (buffers: rank 0's own)."""
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        for (name, p), (a, b) in zip(self.bucket.params, self.bucket.ranges):
            state[name] = self.weights[a:b].view_as(p).clone()
        return state
