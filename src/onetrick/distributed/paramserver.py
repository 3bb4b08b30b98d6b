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

Checkpoints (ps_checkpoint.py), a consistent cut: before its step s (s a multiple of
``--ckpt-every``, not the step resumed from) a worker waits for its last push to be
taken, sends CKPT to every server and joins the checkpoint; a server, handling headers in
order, joins once every worker still training has sent CKPT (so every gradient pushed
before the cut is applied, none after it). Every process then saves its part together:
the servers' shards, momentum, versions and staleness sums; each worker's weights copy,
unpushed accumulation, fetched versions, pushes, counters and RNG. A worker that failed
joins the later checkpoints when the first server tells it to. ``--resume`` (and an
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

Bytes (tag "weights", through :class:`Comm`): a worker sends its gradient every push;
the servers send the weights on every fetch. ``bytes_per_step`` counts what a worker
sends per step (pushes and tiny headers), ``fetch_bytes_per_step`` what the servers send
it per step. CPU only: ``--device cuda`` is refused (servers and messages live on gloo).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from onetrick.config import ConfigError, TrainConfig
from onetrick.data import DataBundle
from onetrick.distributed.comm import Comm
from onetrick.distributed.data_parallel import _Bucket
from onetrick.distributed.hogwild import async_summary, local_config, raise_if_failed, worker_loop
from onetrick.distributed.runtime import Runtime, launch
from onetrick.distributed.strategy import Strategy
from onetrick.recipe import make_sgd, param_groups, schedule_factor, set_lr
from onetrick.run import rundir
from onetrick.run.async_state import attempt_totals, load_latest, resuming
from onetrick.run.evaluate import evaluate
from onetrick.run.ps_checkpoint import NOTICE, Checkpointer
from onetrick.run.records import RunLog, Totals, restart_count
from onetrick.run.source import Source
from onetrick.run.worker_setup import setup, steps_per_epoch, total_steps

PUSH, FETCH, DONE, CKPT = 1, 2, 3, 4
CONTROL, GRADIENT, REPLY, WEIGHTS = 1, 2, 3, 4   # message channels (torch's integer tags; ps_checkpoint has 5, 6)


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
        rundir.begin(cfg, fresh=not cfg.resume and restart_count() == 0)
    dist.barrier()  # run.json before anyone looks for this run's checkpoints
    total = total_steps(data, cfg)
    role = _Server(cfg, strategy.comm, bucket, total) if is_server else _Client(cfg, strategy.comm, bucket, total)
    resumed_at, meta = None, None
    if resuming(cfg):  # every process its own part: a server its shard and momentum, a worker its copy
        resumed_at, meta = load_latest(cfg, role.state(rt.rank))
        role.restore(meta["ranks"][rt.rank])
    ckpt = Checkpointer(rt, cfg, data, strategy.model, bucket, role, attempt_totals(meta))
    log = RunLog(cfg.out, rt.is_main, resumed_at=resumed_at, tensorboard=cfg.tensorboard)
    if is_server:
        mine = role.serve(ckpt)
    else:
        strategy.optimizer = _Accumulate(bucket)  # the update happens on the servers
        mine = worker_loop(cfg, data, strategy, rt.rank, log, before_step=lambda step: role.before(step, ckpt),
                           after_step=role.maybe_push, start=role.totals.steps, totals=role.totals)
        mine.update(role.finish(failed=mine["error"] is not None, ckpt=ckpt))
    mine["resumed_from_step"] = resumed_at
    return _conclude(rt, cfg, data, strategy, bucket, log, mine, ckpt)


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
        self.totals = Totals()                           # worker_loop's counters (restored on resume)
        self.start = 0                                   # the step this attempt starts at

    # -- checkpoints: this worker's copy of the weights, its accumulation, its counters ----
    def state(self, rank: int) -> dict:
        return {f"worker{rank}": {"weights": self.bucket.flat, "accumulated": self.bucket.grad}}

    def counters(self) -> dict:
        return {"steps": self.totals.steps, "images": self.totals.images, "skipped_steps": self.totals.skipped,
                "versions": self.versions, "pushed": self.pushed}

    def restore(self, saved: dict) -> None:
        self.totals = Totals({"steps": saved["steps"], "images": saved["images"],
                              "skipped_steps": saved["skipped_steps"]})
        self.versions, self.pushed = list(saved["versions"]), saved["pushed"]
        self.start = saved["steps"]

    def before(self, step: int, ckpt: Checkpointer) -> None:
        """Before step ``step``: every ``--ckpt-every`` steps (but not at the step resumed
        from) the checkpoint, once the servers have applied all this worker pushed; then
        the fetch."""
        if step % self.cfg.ckpt_every == 0 and step > self.start:
            self._settle()
            for dst in self.servers:
                self.comm.send(_header(CKPT, 0, step), dst, tag="control", channel=CONTROL)
            ckpt.save(step)
        self.maybe_fetch(step)

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

    def finish(self, failed: bool, ckpt: Checkpointer) -> dict:
        """After the last push has been taken: DONE to every server. A worker that failed
        still takes its part in the checkpoints the others write (the first server says
        when, and when there are no more)."""
        self._settle()
        for dst in self.servers:
            self.comm.send(_header(DONE, int(failed)), dst, tag="control", channel=CONTROL)
        notice = torch.zeros(1, dtype=torch.int64)
        while failed:
            self.comm.recv(notice, self.cfg.workers, tag="control", channel=NOTICE)
            if notice.item() < 0:
                break
            ckpt.save(int(notice.item()))
        return {"role": "worker", "pushed": self.pushed}


class _Server:
    """One shard of the weights, its momentum, and the loop that serves the workers."""

    def __init__(self, cfg: TrainConfig, comm: Comm, bucket: _Bucket, total: int) -> None:
        self.cfg, self.comm, self.bucket, self.total = cfg, comm, bucket, total
        named = [(o.name, o.view) for o in bucket.owned]
        self.optimizer = make_sgd(param_groups(named, cfg, cfg.lr), cfg)
        self.momentum = torch.zeros_like(bucket.shard)  # one flat buffer, checkpointed whole
        for o in bucket.owned:
            o.view.grad = o.grad  # pushes are received into grad_shard, which these views cover
            at = o.view.storage_offset() - bucket.shard.storage_offset()
            # SGD updates a buffer it finds in place: from zeros, the same as the one it would create
            self.optimizer.state[o.view]["momentum_buffer"] = self.momentum[at:at + o.view.numel()].view_as(o.view)
        self.version = 0
        self.staleness_sum = self.staleness_max = 0
        self.first = comm.rank == cfg.workers  # the first server tells failed workers of checkpoints

    # -- checkpoints: this server's shard, its momentum, its counters ------------------------
    def state(self, rank: int) -> dict:
        return {f"server{rank - self.cfg.workers}": {"shard": self.bucket.shard, "momentum": self.momentum}}

    def counters(self) -> dict:
        return {"version": self.version, "staleness_sum": self.staleness_sum, "staleness_max": self.staleness_max}

    def restore(self, saved: dict) -> None:
        self.version, self.staleness_sum, self.staleness_max = (
            saved["version"], saved["staleness_sum"], saved["staleness_max"])

    def serve(self, ckpt: Checkpointer) -> dict:
        """Handle headers in arrival order until every worker has said DONE; checkpoint
        once every worker still training has asked (CKPT) at the same step."""
        header = torch.zeros(3, dtype=torch.int64)
        done = asked = 0
        failed: list[int] = []
        while done < self.cfg.workers:
            src = self.comm.recv(header, None, tag="control", channel=CONTROL)
            kind, version, step = header.tolist()
            if kind == PUSH:
                self._apply(src, version, step)
            elif kind == FETCH:
                self._reply(src)
            elif kind == CKPT:
                asked += 1
            else:
                done += 1
                failed += [src] if version else []  # the failure itself is reported by the worker
            if asked and asked + done == self.cfg.workers:
                self._notify(failed, step)
                ckpt.save(step)
                asked = 0
        self._notify(failed, -1)
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

    def _notify(self, failed: list[int], step: int) -> None:
        """The failed workers join checkpoint ``step`` (-1: there are no more)."""
        for dst in failed if self.first else []:
            self.comm.send(torch.tensor([step], dtype=torch.int64), dst, tag="control", channel=NOTICE)

    def _reply(self, src: int) -> None:
        self.comm.send(torch.tensor([self.version], dtype=torch.int64), src, tag="control", channel=REPLY)
        self.comm.send(self.bucket.shard, src, tag="weights", channel=WEIGHTS)


def _conclude(rt: Runtime, cfg: TrainConfig, data: DataBundle, strategy: Strategy, bucket: _Bucket,
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
