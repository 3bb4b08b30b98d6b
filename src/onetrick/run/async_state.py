"""What the asynchronous strategies checkpoint besides the weights, and how they resume.

Hogwild (:class:`Saver`): the parent writes every checkpoint of the shared
:class:`~onetrick.distributed.hogwild.Board` (each worker's momentum in shared memory,
the table of every worker's counters) once the pause handshake has stopped the workers
at a step boundary, so the cut is consistent. The parameter server checkpoints
collectively (run/paramserver.py) and shares the rest: meta.json's ``ranks`` (one
entry per worker, or per process) and ``totals`` (the attempts so far and their wall
time), :func:`load_latest` and :func:`attempt_totals`.
"""
from __future__ import annotations

import time
import warnings

import torch

from onetrick.config import TrainConfig
from onetrick.distributed.hogwild import Board
from onetrick.distributed.runtime import restart_attempt
from onetrick.run import checkpoint, rundir
from onetrick.run.checkpoint import CheckpointError


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
            self.save(self.board.lead_steps())
            self.board.release()


def resuming(cfg: TrainConfig) -> bool:
    """Whether this attempt continues a checkpoint: ``--resume``, or an elastic restart
    (``--max-restarts``) that finds one of its own run's."""
    return cfg.resume or (restart_attempt() > 0 and bool(checkpoint.candidates(cfg.out, rundir.run_id(cfg.out))))


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
