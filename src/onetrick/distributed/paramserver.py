"""Downpour SGD with a sharded parameter server (docs/PAPER.md form 3; DistBelief): the
protocol. The processes, their loop and the run directory are run/paramserver.py's.

Processes: one ``launch`` of ``K + S`` processes (so ``onetrick train --workers K
--servers S`` and ``torchrun --nproc-per-node K+S`` start them alike). Ranks ``0..K-1``
are the workers (:class:`Client`), ranks ``K..K+S-1`` the servers (:class:`Server`);
rank 0, the first worker, writes the run directory.

Sharding: the parameters are laid end to end in one flat vector (data_parallel's
:class:`FlatBucket`) cut into S equal slices, so the servers are balanced to one element
whatever the tensor sizes. Server s owns slice s and applies SGD with momentum and weight
decay to it with the recipe's groups (each piece of a parameter keeps that parameter's
rate and decay: biases 2x lr, no decay), one update per gradient pushed to it; the rate
follows the schedule at the pushing worker's step. Each update is one push (no lr
scaling with K).

Worker step i: if ``i % fetch_every == 0``, fetch every server's slice and its version
(the number of updates it has applied); compute the gradient of batch i at the weights
held and add it to an accumulator (:class:`Accumulate`); if ``(i + 1) % push_every == 0``
(or at the last step), push the accumulated sum, tagged with the version of the weights
it was computed on, to every server and carry on without waiting (the next push first
waits for this one to be taken). Between fetches a worker does not update its own copy
(Downpour).

Protocol, on torch.distributed point-to-point over gloo (not RPC): a worker sends a
header ``[kind, version, step]`` on the CONTROL channel, followed for a PUSH by its
gradient slice (GRADIENT channel); a FETCH is answered with the version (REPLY) and the
slice (WEIGHTS); DONE (version field: 1 if the worker failed) says it sends nothing
more. A server takes headers from whichever worker sends first and handles each before
the next. A worker's messages arrive in the order sent, so its PUSH is applied before its
next FETCH is answered: with K=1 and fetch/push every step this is plain SGD.

Staleness: for every applied gradient, the server's version at that moment minus the
version the worker had fetched (updates the gradient did not see); each server counts
its sum and maximum and the gradients it applied.

Checkpoints, a consistent cut: before its step s (s a multiple of ``--ckpt-every``, not
the step resumed from) a worker waits for its last push to be taken, sends CKPT to every
server and joins the checkpoint; a server, handling headers in order, joins once every
worker still training has sent CKPT (so every gradient pushed before the cut is
applied, none after it). A worker that failed joins the later checkpoints when the first
server tells it to (NOTICE). What each process saves: :meth:`Client.state` and
:meth:`Server.state`; the collective save itself is run/paramserver.py's.

Bytes (tag "weights", through :class:`Comm`): a worker sends its gradient every push;
the servers send the weights on every fetch.
"""
from __future__ import annotations

from typing import Protocol

import torch

from onetrick.config import TrainConfig
from onetrick.distributed.comm import Comm
from onetrick.distributed.data_parallel import FlatBucket
from onetrick.recipe import make_sgd, param_groups, schedule_factor, set_lr

PUSH, FETCH, DONE, CKPT = 1, 2, 3, 4
# message channels (torch's integer tags): the protocol's, then a server's shard to rank 0
# (a checkpoint) and a checkpoint notice to a failed worker
CONTROL, GRADIENT, REPLY, WEIGHTS, SHARDS, NOTICE = 1, 2, 3, 4, 5, 6


class Checkpoints(Protocol):
    """What a role needs of its checkpointer (run/paramserver.py's ``Checkpointer``):
    a collective save of step ``step`` that every process joins at the same cut."""

    def save(self, step: int) -> None: ...


class Counters(Protocol):
    """A worker's running counts, which its training loop updates in place after every
    step (run/records.py's ``Totals``): what a checkpoint records of the worker."""

    steps: int
    images: int
    skipped: int


class Accumulate(torch.optim.Optimizer):
    """A worker's "optimizer": ``step`` adds this batch's gradient to the flat buffer
    the next push sends (so ``SingleStrategy.train_step`` serves unchanged, skipping
    non-finite steps as it does)."""

    def __init__(self, bucket: FlatBucket) -> None:
        super().__init__([p for _, p in bucket.params], {})
        self.bucket = bucket

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for (_, p), (a, b) in zip(self.bucket.params, self.bucket.ranges):
            if p.grad is not None:
                self.bucket.grad[a:b].add_(p.grad.flatten())


def _header(kind: int, version: int = 0, step: int = 0) -> torch.Tensor:
    return torch.tensor([kind, version, step], dtype=torch.int64)


def _part(bucket: FlatBucket, flat: torch.Tensor, s: int) -> torch.Tensor:
    """Server ``s``'s slice of a flat vector laid out as ``bucket``."""
    n = bucket.shard_numel
    return flat[s * n:(s + 1) * n]


class Client:
    """A worker's side of the protocol: fetch, push, done."""

    def __init__(self, cfg: TrainConfig, comm: Comm, bucket: FlatBucket, total: int, totals: Counters) -> None:
        self.cfg, self.comm, self.bucket, self.total = cfg, comm, bucket, total
        self.servers = range(cfg.workers, cfg.workers + cfg.servers)
        self.send_buf = torch.zeros_like(bucket.grad)   # the push in flight; accumulation goes on meanwhile
        self.versions = [0] * cfg.servers                # of the weights held: initial weights are version 0
        self.in_flight: list = []                        # (tensor, work) of the last push: keeps both alive
        self.pushed = 0
        self.totals = totals                             # the training loop's counters (restored on resume)
        self.start = 0                                   # the step this attempt starts at

    # -- checkpoints: this worker's copy of the weights, its accumulation, its counters ----
    def state(self, rank: int) -> dict:
        return {f"worker{rank}": {"weights": self.bucket.flat, "accumulated": self.bucket.grad}}

    def counters(self) -> dict:
        return {"steps": self.totals.steps, "images": self.totals.images, "skipped_steps": self.totals.skipped,
                "versions": self.versions, "pushed": self.pushed}

    def restore(self, saved: dict) -> None:
        self.totals.steps, self.totals.images, self.totals.skipped = (
            saved["steps"], saved["images"], saved["skipped_steps"])
        self.versions, self.pushed = list(saved["versions"]), saved["pushed"]
        self.start = saved["steps"]

    def before(self, step: int, ckpt: Checkpoints) -> None:
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

    def finish(self, failed: bool, ckpt: Checkpoints) -> dict:
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


class Server:
    """One shard of the weights, its momentum, and the loop that serves the workers."""

    def __init__(self, cfg: TrainConfig, comm: Comm, bucket: FlatBucket, total: int) -> None:
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

    def serve(self, ckpt: Checkpoints) -> dict:
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
