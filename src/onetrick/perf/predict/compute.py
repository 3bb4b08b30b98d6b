"""Compute costs of the blocks, the cost model's first input.

A cost provider answers five questions, in seconds, for one worker:

* ``trunk(i, rows)``: forward and backward of trunk block ``i`` on ``rows`` examples;
* ``head(j, rows, width)``: forward and backward of head block ``j``'s ``Linear`` (and the
  layers after it) with ``width`` output neurons (a shard) on ``rows`` examples;
* ``update(sizes)``: SGD with momentum and weight decay on parameter tensors of these
  element counts (a worker's own: shards where the strategy shards them);
* ``copy(nbytes)``: copying gradients into or out of a flat communication bucket;
* ``overhead(rows)``: what a whole step costs beyond its blocks and its update.

:class:`FlopCosts` counts (a named GPU profile of
:data:`~onetrick.perf.predict.hardware.PROFILES`: FLOP at peak x achieved efficiency,
updates at memory bandwidth), :class:`ScaledCosts` scales those counts to a profile's
measured totals, :class:`ZeroCosts` makes every compute free (bytes only). Timing every
block on this machine is :class:`~onetrick.perf.measure.block_times.MeasuredCosts`'s (it
runs the model, so it is a measurement, not part of this pure model).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from onetrick.perf.predict.blocks import Block, param_sizes

FLOAT = 4          # fp32 bytes

__all__ = ["FLOAT", "CostProvider", "FlopCosts", "ScaledCosts", "ZeroCosts"]


class CostProvider(Protocol):
    """What the cost model asks of compute (seconds on one worker)."""

    def trunk(self, i: int, rows: int) -> tuple[float, float]: ...
    def head(self, j: int, rows: int, width: int) -> tuple[float, float]: ...
    def update(self, sizes: Sequence[int]) -> float: ...
    def copy(self, nbytes: int) -> float: ...
    def overhead(self, rows: int) -> float: ...


class FlopCosts:
    """Compute from multiply-add counts at ``peak * efficiency`` FLOP/s (a GPU profile)."""

    def __init__(self, blocks: list[Block], peak_flops: float, efficiency: float, mem_gbs: float) -> None:
        self.blocks, self.rate, self.mem = blocks, peak_flops * efficiency, mem_gbs * 1e9

    def trunk(self, i: int, rows: int) -> tuple[float, float]:
        fwd = 2 * self.blocks[i].macs * rows / self.rate
        return fwd, fwd * (1 if i == 0 else 2)   # the first layer needs no input gradient

    def head(self, j: int, rows: int, width: int) -> tuple[float, float]:
        fin = self.blocks[j].linear[0]
        fwd = 2 * fin * width * rows / self.rate
        return fwd, 2 * fwd

    def update(self, sizes: Sequence[int]) -> float:
        return sum(sizes) * 5 * FLOAT / self.mem       # read w, g, m; write w, m

    def copy(self, nbytes: int) -> float:
        return 2 * nbytes / self.mem                   # read, write

    def overhead(self, rows: int) -> float:
        return 0.0


class ScaledCosts(FlopCosts):
    """FLOP-shaped costs scaled to measured totals: every trunk block's time is its FLOP
    share of the measured trunk forward+backward, every head block's its share of the
    measured head's, at any batch (linear in rows); the measured step's remainder beyond
    trunk, head and the update is the per-step overhead (``measured``: a profile's
    ``{"batch", "step_ms", "trunk_ms", "head_ms"}`` at one precision)."""

    def __init__(self, blocks: list[Block], measured: dict, batch: int, mem_gbs: float) -> None:
        super().__init__(blocks, 1e12, 1.0, mem_gbs)
        rows = batch
        trunk = sum(sum(FlopCosts.trunk(self, i, rows)) for i, b in enumerate(blocks) if b.part == "trunk")
        head = sum(sum(FlopCosts.head(self, j, rows, b.linear[1])) for j, b in enumerate(blocks) if b.linear)
        self.k_trunk = measured["trunk_ms"] / 1e3 / trunk
        self.k_head = measured["head_ms"] / 1e3 / head
        rest = measured["step_ms"] - measured["trunk_ms"] - measured["head_ms"]
        self.per_row = max(0.0, rest / 1e3 - self.update(param_sizes(blocks))) / rows

    def trunk(self, i: int, rows: int) -> tuple[float, float]:
        fwd, bwd = super().trunk(i, rows)
        return fwd * self.k_trunk, bwd * self.k_trunk

    def head(self, j: int, rows: int, width: int) -> tuple[float, float]:
        fwd, bwd = super().head(j, rows, width)
        return fwd * self.k_head, bwd * self.k_head

    def overhead(self, rows: int) -> float:
        return self.per_row * rows


class ZeroCosts:
    """No compute at all: what remains of a step is its bytes and its collectives."""

    def overhead(self, rows: int) -> float:
        return 0.0

    def trunk(self, i: int, rows: int) -> tuple[float, float]:
        return 0.0, 0.0

    def head(self, j: int, rows: int, width: int) -> tuple[float, float]:
        return 0.0, 0.0

    def update(self, sizes: Sequence[int]) -> float:
        return 0.0

    def copy(self, nbytes: int) -> float:
        return 0.0
