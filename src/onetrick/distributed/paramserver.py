"""Downpour SGD with a sharded parameter server (docs/PAPER.md form 3; DistBelief).

Processes: one ``launch`` of ``K + S`` processes (so ``onetrick train --workers K
--servers S`` and ``torchrun --nproc-per-node K+S`` start them alike). Ranks ``0..K-1``
are the workers, ranks ``K..K+S-1`` the servers; rank 0, the first worker, writes the
run directory.

Sharding: the parameters are laid end to end in one flat vector (data_parallel's
``_Bucket``) cut into S equal slices, so the servers are balanced to one element
whatever the tensor sizes. Server s owns slice s and applies SGD with momentum and weight
decay to it with the recipe's groups (each piece of a parameter keeps that parameter's
rate and decay: biases 2x lr, no decay), one update per gradient pushed to it; the rate
follows the schedule at the pushing worker's step. Each update is one push (no lr
scaling with K).

Worker step i: if ``i % fetch_every == 0``, fetch every server's slice and its version
(the number of updates it has applied); compute the gradient of batch i at the weights
held and add it to an accumulator; if ``(i + 1) % push_every == 0`` (or at the last
step), push the accumulated sum, tagged with the version of the weights it was computed
on, to every server and carry on without waiting (the next push first waits for this
one to be taken). Between fetches a worker does not update its own copy (Downpour).

Protocol, on torch.distributed point-to-point over gloo (not RPC): a worker sends a
header ``[kind, version, step]`` on the CONTROL channel, followed for a PUSH by its
gradient slice (GRADIENT channel); a FETCH is answered with the version (REPLY) and the
slice (WEIGHTS); DONE (version field: 1 if the worker failed) says it sends nothing
more. A server takes headers from whichever worker sends first and handles each before
the next. A worker's messages arrive in the order sent, so its PUSH is applied before its
next FETCH is answered: with K=1 and fetch/push every step this is plain SGD.

Staleness: for every applied gradient, the server's version at that moment minus the
version the worker had fetched (updates the gradient did not see). summary.json reports
its mean and maximum, ``gradients_pushed`` (one per push and server) and
``gradients_applied`` (summed over servers); they must be equal, and
:func:`train_paramserver` raises if not.

End: a server stops after K DONE messages and sends its final slice to rank 0, which
evaluates the final weights; every rank gathers the counters, rank 0 writes
summary.json and all save a checkpoint of the final weights (rank 0's; momentum stays on
the servers, so ``--resume`` is refused).

Failures, what is guaranteed: an exception in a worker's training (data, a non-finite
loss with ``--on-nan stop``, the ``ONETRICK_ASYNC_FAIL_AT`` hook) ends that worker's
loop; what it already pushed is still applied, its unpushed accumulation is dropped
(and not counted as pushed), it sends DONE with the failure flag and waits for the end
like the others. Servers and other workers run to completion, summary.json lists the
failure, then :func:`train_paramserver` raises :class:`WorkerFailure`. A process that
*exits* (SIGKILL, segfault, OOM killer) is outside this guarantee: torch elastic then
stops the whole job and ``launch`` raises WorkerFailure; a peer that stops answering
makes the others fail after ``--timeout`` seconds rather than hang.

Bytes (tag "weights", through :class:`Comm`): a worker sends its gradient every push;
the servers send the weights on every fetch. ``bytes_per_step`` counts what a worker
sends per step (pushes and tiny headers), ``fetch_bytes_per_step`` what the servers send
it per step. CPU only: ``--device cuda`` is refused (servers and messages live on gloo).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import checkpoint, rundir
from ..config import ConfigError, TrainConfig
from ..data import DataBundle
from ..evaluate import evaluate
from ..recipe import make_sgd, param_groups, schedule_factor, set_lr
from ..records import RunLog
from ..source import Source
from ..worker import setup, steps_per_epoch, total_steps
from .comm import Comm
from .data_parallel import _Bucket
from .asynchronous import (
    async_summary,
    local_config,
    raise_if_failed,
    run_meta,
    worker_loop,
)
from .runtime import Runtime, launch
from .strategy import Strategy

PUSH, FETCH, DONE = 1, 2, 3
CONTROL, GRADIENT, REPLY, WEIGHTS, FINAL = 1, 2, 3, 4, 5   # message channels (torch's integer tags)


def train_paramserver(cfg: TrainConfig, source: Source | None = None) -> dict:
    """Train with ``cfg.workers`` Downpour workers and ``cfg.servers`` servers; return the summary.

    Raises :class:`WorkerFailure` (after writing summary.json) if a worker failed, and
    RuntimeError if a pushed gradient was not applied exactly once.
    """
    if cfg.device != "cpu":
        raise ConfigError("--strategy paramserver runs on the CPU (its servers talk gloo point-to-point); use --device cpu")
    results = launch(_process, cfg, source, nprocs=cfg.workers + cfg.servers)
    summary = results[min(results)]
    if summary["gradients_pushed"] != summary["gradients_applied"]:
        raise RuntimeError(f"lost gradients: {summary['gradients_pushed']} pushed, {summary['gradients_applied']} applied")
    raise_if_failed(summary, cfg)
    return summary


def _process(rt: Runtime, cfg: TrainConfig, source: Source | None = None) -> dict:
    """Every process: the same model and flat layout, then its role, then the end together."""
    if rt.world != cfg.workers + cfg.servers:
        raise ConfigError(f"--strategy paramserver needs {cfg.workers + cfg.servers} processes "
                          f"(--workers {cfg.workers} + --servers {cfg.servers}), got {rt.world}")
    data, strategy = setup(rt, local_config(cfg), source)
    is_server = rt.rank >= cfg.workers
    bucket = _Bucket(list(strategy.model.named_parameters()), cfg.servers, rt.rank - cfg.workers if is_server else 0)
    if rt.is_main:
        rundir.begin(cfg, fresh=True)
    log = RunLog(cfg.out, rt.is_main, tensorboard=cfg.tensorboard)
    if is_server:
        server = _Server(cfg, strategy.comm, bucket, total_steps(data, cfg))
        mine = server.serve()
        strategy.comm.send(bucket.shard, 0, tag="final", channel=FINAL)
    else:
        client = _Client(cfg, strategy.comm, bucket, total_steps(data, cfg))
        strategy.optimizer = _Accumulate(bucket)  # the update happens on the servers
        mine = worker_loop(cfg, data, strategy, rt.rank, log, before_step=client.maybe_fetch,
                           after_step=client.maybe_push)
        mine.update(client.finish(failed=mine["error"] is not None))
    return _conclude(rt, cfg, data, strategy, bucket, log, mine)


class _Accumulate(torch.optim.Optimizer):
    """A worker's "optimizer": ``step`` adds this batch's gradient to the flat buffer
    the next push sends (so ``SingleStrategy.train_step`` serves unchanged, skipping
    non-finite steps as it does)."""

    def __init__(self, bucket: _Bucket) -> None:
        super().__init__([p for _, p in bucket.params], {})
        self.bucket = bucket

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for (_, p), (a, b) in zip(self.bucket.params, self.bucket.ranges):
            if p.grad is not None:
                self.bucket.grad[a:b].add_(p.grad.flatten())


def _header(kind: int, version: int = 0, step: int = 0) -> torch.Tensor:
    return torch.tensor([kind, version, step], dtype=torch.int64)


def _part(bucket: _Bucket, flat: torch.Tensor, s: int) -> torch.Tensor:
    """Server ``s``'s slice of a flat vector laid out as ``bucket``."""
    n = bucket.shard_numel
    return flat[s * n:(s + 1) * n]


class _Client:
    """A worker's side of the protocol: fetch, push, done."""

    def __init__(self, cfg: TrainConfig, comm: Comm, bucket: _Bucket, total: int) -> None:
        self.cfg, self.comm, self.bucket, self.total = cfg, comm, bucket, total
        self.servers = range(cfg.workers, cfg.workers + cfg.servers)
        self.send_buf = torch.zeros_like(bucket.grad)   # the push in flight; accumulation goes on meanwhile
        self.versions = [0] * cfg.servers                # of the weights held: initial weights are version 0
        self.in_flight: list = []                        # (tensor, work) of the last push: keeps both alive
        self.pushed = 0

    def maybe_fetch(self, step: int) -> None:
        """Every ``fetch_every`` steps: every server's slice, straight into the model's weights."""
        if step % self.cfg.fetch_every:
            return
        replies = [torch.zeros(1, dtype=torch.int64) for _ in self.servers]
        pending = []
        for s, dst in enumerate(self.servers):
            header, weights = _header(FETCH), _part(self.bucket, self.bucket.flat, s)
            pending += [(header, self.comm.isend(header, dst, tag="control", channel=CONTROL)),
                        (replies[s], self.comm.irecv(replies[s], dst, tag="control", channel=REPLY)),
                        (weights, self.comm.irecv(weights, dst, tag="weights", channel=WEIGHTS))]
        for _, work in pending:
            self.comm.wait(work)
        self.versions = [int(r) for r in replies]

    def _settle(self) -> None:
        for _, work in self.in_flight:
            self.comm.wait(work)
        self.in_flight = []

    def maybe_push(self, step: int) -> None:
        """Every ``push_every`` steps and at the last: the accumulated gradient to every
        server, asynchronously (a double buffer lets the next steps accumulate meanwhile)."""
        if (step + 1) % self.cfg.push_every and step + 1 != self.total:
            return
        self._settle()
        self.send_buf.copy_(self.bucket.grad)
        self.bucket.grad.zero_()
        for s, dst in enumerate(self.servers):
            header, grad = _header(PUSH, self.versions[s], step), _part(self.bucket, self.send_buf, s)
            self.in_flight += [(header, self.comm.isend(header, dst, tag="control", channel=CONTROL)),
                               (grad, self.comm.isend(grad, dst, tag="weights", channel=GRADIENT))]
            self.pushed += 1

    def finish(self, failed: bool) -> dict:
        """After the last push has been taken: DONE to every server."""
        self._settle()
        for dst in self.servers:
            self.comm.send(_header(DONE, int(failed)), dst, tag="control", channel=CONTROL)
        return {"role": "worker", "pushed": self.pushed}


class _Server:
    """One shard of the weights, its momentum, and the loop that serves the workers."""

    def __init__(self, cfg: TrainConfig, comm: Comm, bucket: _Bucket, total: int) -> None:
        self.cfg, self.comm, self.bucket, self.total = cfg, comm, bucket, total
        named = [(o.name, o.view) for o in bucket.owned]
        self.optimizer = make_sgd(param_groups(named, cfg, cfg.lr), cfg)
        for o in bucket.owned:
            o.view.grad = o.grad  # pushes are received into grad_shard, which these views cover
        self.version = 0
        self.staleness_sum = self.staleness_max = 0

    def serve(self) -> dict:
        """Handle headers in arrival order until every worker has said DONE."""
        header = torch.zeros(3, dtype=torch.int64)
        done = 0
        while done < self.cfg.workers:
            src = self.comm.recv(header, None, tag="control", channel=CONTROL)
            kind, version, step = header.tolist()
            if kind == PUSH:
                self._apply(src, version, step)
            elif kind == FETCH:
                self._reply(src)
            else:
                done += 1  # the failure flag (version field) is reported by the worker itself
        sent = self.comm.take()["bytes"]
        return {"role": "server", "applied": self.version, "staleness_sum": self.staleness_sum,
                "staleness_max": self.staleness_max, "fetch_bytes": sent.get("weights", 0)}

    def _apply(self, src: int, version: int, step: int) -> None:
        self.comm.recv(self.bucket.grad_shard, src, tag="weights", channel=GRADIENT)
        staleness = self.version - version
        self.staleness_sum += staleness
        self.staleness_max = max(self.staleness_max, staleness)
        set_lr([self.optimizer], schedule_factor(self.cfg, step, self.total))
        self.optimizer.step()
        self.version += 1

    def _reply(self, src: int) -> None:
        self.comm.send(torch.tensor([self.version], dtype=torch.int64), src, tag="control", channel=REPLY)
        self.comm.send(self.bucket.shard, src, tag="weights", channel=WEIGHTS)


def _conclude(rt: Runtime, cfg: TrainConfig, data: DataBundle, strategy: Strategy, bucket: _Bucket,
              log: RunLog, mine: dict) -> dict:
    """Every rank: rank 0 takes the final weights and evaluates them, the counters are
    gathered, rank 0 writes summary.json, all save the checkpoint, all return the summary."""
    if rt.rank == 0:
        for s in range(cfg.servers):
            strategy.comm.recv(_part(bucket, bucket.flat, s), cfg.workers + s, tag="final", channel=FINAL)
    everyone: list = [None] * rt.world
    dist.all_gather_object(everyone, mine)
    summary = [None]
    if rt.rank == 0:
        test = evaluate(strategy, data, cfg)
        summary[0] = _summary(cfg, test, everyone)
        steps = summary[0]["steps"]
        log.write({"kind": "test", "step": steps, "epoch": steps / steps_per_epoch(data, cfg), **test})
        log.summary(cfg.out, summary[0])
    dist.broadcast_object_list(summary, src=0)
    state = strategy.state_dict() if rt.rank == 0 else {}  # rank 0 alone holds the final weights
    checkpoint.save(cfg.out, summary[0]["steps"], state, run_meta(cfg, data))
    return summary[0]


def _summary(cfg: TrainConfig, test: dict, everyone: list[dict]) -> dict:
    workers = [m for m in everyone if m["role"] == "worker"]
    servers = [m for m in everyone if m["role"] == "server"]
    applied = sum(s["applied"] for s in servers)
    worker_steps = max(1, sum(w["totals"].steps for w in workers))
    extra = {
        "servers": cfg.servers, "fetch_every": cfg.fetch_every, "push_every": cfg.push_every,
        "staleness_mean": sum(s["staleness_sum"] for s in servers) / applied if applied else 0.0,
        "staleness_max": max(s["staleness_max"] for s in servers),
        "gradients_pushed": sum(w["pushed"] for w in workers), "gradients_applied": applied,
        "fetch_bytes_per_step": sum(s["fetch_bytes"] for s in servers) / worker_steps,
    }
    return async_summary(cfg, test, workers, [], extra)
