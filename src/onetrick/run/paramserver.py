"""A parameter-server run (Downpour SGD; the protocol, and what Downpour is, are
distributed/paramserver.py's): every process, its role, its checkpoints, and the end
together.

Processes: one ``launch`` of ``K + S`` processes; the workers run
``async_loop.worker_loop`` with the protocol's communication before and after each
step, the servers serve. Every process builds its data and model through
``worker_setup.setup``.

Summary: staleness mean and maximum over every applied gradient, ``gradients_pushed``
(one per push and server) and ``gradients_applied`` (summed over servers); they must be
equal, and :func:`train_paramserver` raises if not.

Checkpoints (:class:`Checkpointer`): one collective over every process (workers and
servers), at the protocol's consistent cut. What each process saves (DCP): a server its
shard of the weights and its flat momentum (``server<s>/shard``, ``server<s>/momentum``);
a worker its copy of the weights and its unpushed accumulation (``worker<i>/weights``,
``worker<i>/accumulated``); rank 0 also the whole model as the servers hold it
(``model``, for eval/export/plot). meta.json's ``ranks`` has every process's counters (a
worker's steps, images, skipped steps, the versions it holds and its pushes; a server's
version and staleness sums), ``totals`` the attempts so far. ``--resume`` (and an
elastic restart, ``--max-restarts``) loads all of it: with K=1 a resumed run is
bit-identical to an uninterrupted one; staleness and pushed/applied counts cover the run.

End: a server stops after K DONE messages; every rank gathers the counters, all save the
final checkpoint (rank 0 takes the servers' final slices for its ``model``), rank 0
evaluates those weights and writes summary.json.

Failures, what is guaranteed: an exception in a worker's training (data, a non-finite
loss with ``--on-nan stop``, the ``ONETRICK_ASYNC_FAIL_AT`` hook) ends that worker's
loop; what it already pushed is still applied, its unpushed accumulation is dropped
(and not counted as pushed), it sends DONE with the failure flag and waits for the end
like the others. Servers and other workers run to completion, summary.json lists the
failure, then :func:`train_paramserver` raises :class:`WorkerFailure`. A process that
*exits* (SIGKILL, segfault, OOM killer) is outside this guarantee: torch elastic then
stops the whole job and ``launch`` raises WorkerFailure; a peer that stops answering
makes the others fail after ``--timeout`` seconds rather than hang.

Bytes: ``bytes_per_step`` counts what a worker sends per step (pushes and tiny
headers), ``fetch_bytes_per_step`` what the servers send it per step. CPU only:
``--device cuda`` is refused (servers and messages live on gloo).
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from onetrick.config import ConfigError, TrainConfig
from onetrick.data import DataBundle
from onetrick.distributed.data_parallel import FlatBucket
from onetrick.distributed.hogwild import local_config
from onetrick.distributed.paramserver import SHARDS, Accumulate, Client, Server
from onetrick.distributed.runtime import Runtime, announce_restart, launch, restart_attempt
from onetrick.distributed.strategy import Strategy
from onetrick.run import checkpoint, rundir
from onetrick.run.async_loop import async_summary, raise_if_failed, run_meta, worker_loop
from onetrick.run.async_state import attempt_record, attempt_totals, load_latest, resuming
from onetrick.run.evaluate import evaluate
from onetrick.run.records import RunLog, Totals
from onetrick.run.source import Source
from onetrick.run.worker_setup import setup, steps_per_epoch, total_steps


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
    bucket = FlatBucket(list(strategy.model.named_parameters()), cfg.servers, rt.rank - cfg.workers if is_server else 0)
    if rt.is_main:
        rundir.begin(cfg, fresh=not cfg.resume and restart_attempt() == 0)
    dist.barrier()  # run.json before anyone looks for this run's checkpoints
    total = total_steps(data, cfg)
    role = Server(cfg, strategy.comm, bucket, total) if is_server else Client(cfg, strategy.comm, bucket, total, Totals())
    resumed_at, meta = None, None
    if resuming(cfg):  # every process its own part: a server its shard and momentum, a worker its copy
        resumed_at, meta = load_latest(cfg, role.state(rt.rank))
        announce_restart(rt, resumed_at)
        role.restore(meta["ranks"][rt.rank])
    ckpt = Checkpointer(rt, cfg, data, strategy.model, bucket, role, attempt_totals(meta))
    log = RunLog(cfg.out, rt.is_main, resumed_at=resumed_at, tensorboard=cfg.tensorboard)
    if is_server:
        mine = role.serve(ckpt)
    else:
        strategy.optimizer = Accumulate(bucket)  # the update happens on the servers
        mine = worker_loop(cfg, data, strategy, rt.rank, log, before_step=lambda step: role.before(step, ckpt),
                           after_step=role.maybe_push, start=role.totals.steps, totals=role.totals)
        mine.update(role.finish(failed=mine["error"] is not None, ckpt=ckpt))
    mine["resumed_from_step"] = resumed_at
    return _conclude(rt, cfg, data, strategy, bucket, log, mine, ckpt)


def _conclude(rt: Runtime, cfg: TrainConfig, data: DataBundle, strategy: Strategy, bucket: FlatBucket,
              log: RunLog, mine: dict, ckpt: Checkpointer) -> dict:
    """Every rank: the counters are gathered, all save the final checkpoint (rank 0 takes
    the servers' final weights for it), rank 0 evaluates them and writes summary.json,
    all return the summary."""
    everyone: list = [None] * rt.world
    dist.all_gather_object(everyone, mine)
    ckpt.save(max(m["totals"].steps for m in everyone if m["role"] == "worker"))
    summary = [None]
    if rt.rank == 0:
        bucket.flat.copy_(ckpt.weights)  # the servers' final weights
        test = evaluate(strategy, data, cfg)
        summary[0] = _summary(cfg, test, everyone, ckpt.prior)
        steps = summary[0]["steps"]
        log.write({"kind": "test", "step": steps, "epoch": steps / steps_per_epoch(data, cfg), **test})
        log.summary(cfg.out, summary[0])
    dist.broadcast_object_list(summary, src=0)
    return summary[0]


def _summary(cfg: TrainConfig, test: dict, everyone: list[dict], prior: dict) -> dict:
    """summary.json: the workers' counters as every asynchronous run reports them, plus
    the servers' staleness and the pushed/applied counts that prove nothing was lost."""
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
        "resumed_from_step": everyone[0]["resumed_from_step"],
    }
    return async_summary(cfg, test, workers, [], extra, prior)


class Checkpointer:
    """Every process holds one; :meth:`save` is collective."""

    def __init__(self, rt: Runtime, cfg: TrainConfig, data: DataBundle, model: torch.nn.Module, bucket: FlatBucket,
                 role: Client | Server, prior: dict) -> None:
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
