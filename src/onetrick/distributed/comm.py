"""Collectives with byte and time accounting.

Every collective a strategy issues goes through a :class:`Comm`, which records the bytes
this worker *sends* under a tag ("weights", "activations", ...) and the seconds the
worker spends blocked waiting on communication. Bytes are those a bandwidth-optimal
(ring / pipelined) implementation sends per worker, with K workers and n the bytes of
the full tensor:

=================  ========================
all_reduce         2 (K-1)/K * n
reduce_scatter     (K-1)/K * n   (n = input)
all_gather         (K-1)/K * n   (n = output)
broadcast          (K-1)/K * n   (averaged over roots; the root of a star sends (K-1) n)
reduce             (K-1)/K * n   (likewise)
all_to_all         (K-1)/K * n
send               n
=================  ========================

so the totals can be checked against the analytic expectation for a model (tests do).

``wire_dtype`` (``--comm-dtype``) is the dtype on the network for the tags in
:data:`WIRE_TAGS` (trunk gradients and weights, activations and their gradients): a
floating tensor of another dtype is cast before the collective and cast back into the
caller's tensor after it (after ``wait`` for an asynchronous one), and its bytes are
counted at the size actually sent, so bf16 halves them. Labels, metrics, checkpoint
and evaluation traffic, and whatever runs inside :meth:`Comm.exact`, keep their dtype.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


#: the tags whose floating tensors travel in ``Comm.wire_dtype`` (the trunk's gradients
#: and weights, the last-conv activations, the FC head's exchanges; see tensor_parallel)
WIRE_TAGS = frozenset({"weights", "activations", "fc_activations"})


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _CastBack:
    """An asynchronous collective run on wire-dtype copies: ``wait`` waits for it, then
    copies the results back into the caller's tensors (casting to their dtype)."""

    def __init__(self, work, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.work, self.pairs = work, pairs

    def wait(self) -> bool:
        self.work.wait()
        for dst, wire in self.pairs:
            dst.copy_(wire)
        return True


class Comm:
    """A process group plus counters. ``group=None`` means the default group."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.wait_s = 0.0
        self.wire_dtype: torch.dtype = torch.float32
        self._exact = False

    # -- the dtype on the wire ---------------------------------------------------------
    @contextmanager
    def exact(self):
        """Collectives inside keep their tensors' dtype whatever ``wire_dtype`` says
        (statistics that must stay fp32: the sharded cross-entropy's)."""
        old, self._exact = self._exact, True
        try:
            yield
        finally:
            self._exact = old

    def _wire(self, t: torch.Tensor, tag: str) -> torch.Tensor:
        """``t`` as sent: cast to ``wire_dtype`` where its tag travels in it, else itself."""
        if self._exact or tag not in WIRE_TAGS or not t.is_floating_point() or t.dtype == self.wire_dtype:
            return t
        return t.to(self.wire_dtype)

    def _wired(self, fn, outs: list[torch.Tensor], wires: list[torch.Tensor], async_op: bool):
        """Run ``fn`` (a collective on ``wires``); copy every wire that is not the
        caller's own tensor back into its ``outs`` entry."""
        pairs = [(o, w) for o, w in zip(outs, wires) if w is not o]
        work = fn()
        if not pairs:
            return work
        if async_op:
            return _CastBack(work, pairs)
        for o, w in pairs:
            o.copy_(w)
        return None

    # -- accounting ------------------------------------------------------------
    def record(self, tag: str, op: str, nbytes: float) -> None:
        self.bytes[tag] += int(nbytes)
        self.calls[f"{tag}/{op}"] += 1

    @contextmanager
    def waiting(self):
        """Time a region where this worker is blocked on communication."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.wait_s += time.perf_counter() - start

    def wait(self, work) -> None:
        if work is not None:
            with self.waiting():
                work.wait()

    def take(self) -> dict:
        """Counters since the last call, then reset them: bytes by tag, collective calls
        by ``"tag/op"`` (each one a point where the workers meet), and seconds waited."""
        snap = {"bytes": dict(self.bytes), "bytes_total": sum(self.bytes.values()),
                "calls": dict(self.calls), "calls_total": sum(self.calls.values()), "comm_wait_s": self.wait_s}
        self.bytes.clear()
        self.calls.clear()
        self.wait_s = 0.0
        return snap

    # -- collectives (sync unless async_op=True; returns the Work handle then) ---
    def _frac(self) -> float:
        return (self.size - 1) / self.size

    def _run(self, fn, *args, async_op: bool):
        if async_op:
            return fn(*args, group=self.group, async_op=True)
        with self.waiting():
            fn(*args, group=self.group)
        return None

    def all_reduce(self, t: torch.Tensor, tag: str, op=dist.ReduceOp.SUM, async_op: bool = False):
        w = self._wire(t, tag)
        self.record(tag, "all_reduce", 2 * self._frac() * _nbytes(w))
        return self._wired(lambda: self._run(lambda x, group, async_op=False: dist.all_reduce(
            x, op=op, group=group, async_op=async_op), w, async_op=async_op), [t], [w], async_op)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, tag: str, async_op: bool = False):
        wi, wo = self._wire(inp, tag), self._wire(out, tag)
        self.record(tag, "reduce_scatter", self._frac() * _nbytes(wi))
        return self._wired(lambda: self._run(_reduce_scatter, wo, wi, async_op=async_op), [out], [wo], async_op)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, tag: str, async_op: bool = False):
        wi, wo = self._wire(inp, tag), self._wire(out, tag)
        self.record(tag, "all_gather", self._frac() * _nbytes(wo))
        return self._wired(lambda: self._run(_all_gather, wo, wi, async_op=async_op), [out], [wo], async_op)

    def broadcast(self, t: torch.Tensor, src: int, tag: str, async_op: bool = False):
        """``src`` is a rank within this Comm's group. The root's ``t`` is left as it is
        (it may be a view of a tensor autograd saved), even when the wire rounds it."""
        w = self._wire(t, tag)
        self.record(tag, "broadcast", self._frac() * _nbytes(w))
        global_src = dist.get_global_rank(self.group, src) if self.group is not None else src
        back = [w] if src == self.rank else [t]
        return self._wired(lambda: self._run(lambda x, group, async_op=False: dist.broadcast(
            x, global_src, group=group, async_op=async_op), w, async_op=async_op), back, [w], async_op)

    def reduce(self, t: torch.Tensor, dst: int, tag: str, async_op: bool = False):
        """Sum into ``t`` on ``dst`` (a rank within this Comm's group)."""
        w = self._wire(t, tag)
        self.record(tag, "reduce", self._frac() * _nbytes(w))
        global_dst = dist.get_global_rank(self.group, dst) if self.group is not None else dst
        return self._wired(lambda: self._run(lambda x, group, async_op=False: dist.reduce(
            x, global_dst, group=group, async_op=async_op), w, async_op=async_op), [t], [w], async_op)

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, tag: str, async_op: bool = False):
        wi, wo = self._wire(inp, tag), self._wire(out, tag)
        self.record(tag, "all_to_all", self._frac() * _nbytes(wi))
        return self._wired(lambda: self._run(lambda o, i, group, async_op=False: dist.all_to_all_single(
            o, i, group=group, async_op=async_op), wo, wi, async_op=async_op), [out], [wo], async_op)

    def barrier(self) -> None:
        with self.waiting():
            dist.barrier(group=self.group)

    # -- point-to-point (peers are ranks within this Comm's group; ``channel`` is torch's
    #    integer message tag, which keeps message kinds apart between the same two ranks) --
    def send(self, t: torch.Tensor, dst: int, tag: str, channel: int = 0) -> None:
        """Blocking send of ``t`` to ``dst``: n bytes."""
        self.record(tag, "send", _nbytes(t))
        with self.waiting():
            dist.send(t, group=self.group, group_dst=dst, tag=channel)

    def isend(self, t: torch.Tensor, dst: int, tag: str, channel: int = 0):
        """Asynchronous send; keep ``t`` alive and unchanged until the returned Work is waited on."""
        self.record(tag, "send", _nbytes(t))
        return dist.isend(t, group=self.group, group_dst=dst, tag=channel)

    def recv(self, t: torch.Tensor, src: int | None, tag: str, channel: int = 0) -> int:
        """Blocking receive into ``t`` from ``src`` (``None``: whichever rank sends first).

        Returns the sender's rank. Receiving sends nothing: a call is counted, no bytes."""
        self.record(tag, "recv", 0)
        with self.waiting():
            sender = dist.recv(t, group=self.group, group_src=src, tag=channel)
        return dist.get_group_rank(self.group, sender) if self.group is not None else sender

    def irecv(self, t: torch.Tensor, src: int, tag: str, channel: int = 0):
        """Asynchronous receive into ``t`` from ``src``; returns the Work handle."""
        self.record(tag, "recv", 0)
        return dist.irecv(t, group=self.group, group_src=src, tag=channel)
