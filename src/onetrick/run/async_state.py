"""What the asynchronous strategies checkpoint besides the weights, and how they resume.

Hogwild (:class:`Board`, :class:`Saver`): each worker's momentum buffers live in shared
memory, allocated by the parent and updated in place by the worker's SGD, next to a
table of every worker's counters and a pause handshake, so the parent can write a
consistent checkpoint of the whole run while the workers wait at a step boundary. The
parameter server checkpoints collectively (see paramserver.py) and shares the rest:
meta.json's ``ranks`` (one entry per worker, or per process) and ``totals`` (the
attempts so far and their wall time), :func:`load_latest` and :func:`attempt_totals`.
"""
from __future__ import annotations

import time
import warnings

import torch

from onetrick.config import TrainConfig
from onetrick.run import checkpoint, rundir
from onetrick.run.checkpoint import CheckpointError
from onetrick.run.records import restart_count

PAUSE_S = 0.002       # how often a paused worker looks whether the checkpoint is written
STEPS, IMAGES, SKIPPED, PAUSED, DONE = range(5)   # columns of the shared counters table


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


class Saver:
    """Hogwild's parent writes every checkpoint: the board's state, named by a step."""

    def __init__(self, cfg: TrainConfig, meta: dict, model: torch.nn.Module, board: Board, prior: dict) -> None:
        self.cfg, self.meta, self.model, self.board, self.prior = cfg, meta, model, board, prior
        self.start = time.monotonic()

    def save(self, step: int) -> None:
        meta = {**self.meta, "ranks": self.board.ranks(), "totals": attempt_record(self.prior, self.start)}
        with warnings.catch_warnings():  # DCP warns that it saves from one process: it does, on purpose
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            checkpoint.save(self.cfg.out, step, self.board.state(self.model), meta)

    def tick(self, procs: list) -> None:
        """Asked for and every worker paused: write the checkpoint (named by worker 0's
        step), release the workers."""
        if self.board.ready(procs):
            self.save(int(self.board.counters[0, STEPS]))
            self.board.release()


def resuming(cfg: TrainConfig) -> bool:
    """Whether this attempt continues a checkpoint: ``--resume``, or an elastic restart
    (``--max-restarts``) that finds one of its own run's."""
    return cfg.resume or (restart_count() > 0 and bool(checkpoint.candidates(cfg.out, rundir.run_id(cfg.out))))


def load_latest(cfg: TrainConfig, state: dict) -> tuple[int, dict]:
    """Fill ``state`` in place from the newest readable checkpoint (collective under
    torch.distributed): ``--resume`` takes any, a restart only its own run's. Returns
    ``(step, meta)``."""
    own = None if cfg.resume else rundir.run_id(cfg.out)
    with warnings.catch_warnings():  # Hogwild's parent loads alone, on purpose
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        step, path = checkpoint.load(cfg.out, state, own)
    meta = checkpoint.read_meta(path)
    if "ranks" not in meta:  # rundir checks --resume before any worker starts; a restart lands here
        raise CheckpointError(f"{path} holds no {cfg.strategy} state: it cannot be resumed")
    return step, meta


def attempt_totals(meta: dict | None) -> dict:
    """What the earlier attempts add to summary.json: their wall time and their count."""
    totals = (meta or {}).get("totals", {})
    return {"wall_s": totals.get("wall_s", 0.0), "attempts": totals.get("attempts", 0)}


def attempt_record(prior: dict, start: float) -> dict:
    """meta.json's ``totals``: the attempts so far (this one included) and their wall time."""
    return {"wall_s": prior["wall_s"] + time.monotonic() - start, "attempts": prior["attempts"] + 1}
