"""What a training run writes and counts, for the synchronous loop and the asynchronous
strategies alike: ``metrics.jsonl`` and ``summary.json`` (:class:`RunLog`), running totals
that survive restarts and resumes (:class:`Totals`), cuda-convnet2's per-layer stats, and
the crash hook the tests use.

Everything written is valid JSON: a NaN or infinite value (a diverged loss) becomes
``null``. Read back (:func:`read_records`), a line that begins like a record and does
not parse is a write a crash cut short (left out by ``onetrick plot``); any other line
that is not a record is damage, which ``plot`` refuses. A resumed run drops both,
saying so in one line each.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from onetrick.distributed.runtime import restart_attempt
from onetrick.run.checkpoint import atomic_write_text

CRASH_ENV = "ONETRICK_CRASH_AT"


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss (``--on-nan stop``)."""


def maybe_crash(step: int, rank: int) -> None:
    """Testing hook: ONETRICK_CRASH_AT=STEP[:RANK] SIGKILLs this worker after that step
    of the first attempt, as a power cut would (no cleanup, no checkpoint)."""
    spec = os.environ.get(CRASH_ENV)
    if spec and restart_attempt() == 0:
        at, _, who = spec.partition(":")
        if step == int(at) and rank == int(who or 0):
            os.kill(os.getpid(), signal.SIGKILL)


Named = Iterable[tuple[str, torch.Tensor]]


def _named(weights: torch.nn.Module | Named) -> Named:
    return weights.named_parameters() if isinstance(weights, torch.nn.Module) else weights


def weights_copy(weights: torch.nn.Module | Named) -> dict[str, torch.Tensor]:
    """A copy of the weight matrices and kernels of ``weights`` (a module, or ``(name,
    tensor)`` pairs such as :meth:`Strategy.named_weights`; biases left out), for
    :func:`layer_stats`."""
    return {n: p.detach().float().clone() for n, p in _named(weights) if n.endswith("weight")}


def layer_stats(weights: torch.nn.Module | Named, before: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """cuda-convnet2's per-layer log: |w| (RMS) and |dw|/|w| for the last update. Consumes
    ``before`` (it becomes dw in place): the only memory a logged step adds is that one
    copy, however large the classifier."""
    out = {}
    for name, p in _named(weights):
        if name in before:
            w = p.detach().float()
            scale = w.numel() ** -0.5
            rms = torch.linalg.vector_norm(w).item() * scale
            dw = torch.linalg.vector_norm(before[name].sub_(w)).item() * scale
            out[name] = {"w": rms, "dw_over_w": dw / rms if rms else 0.0}
    return out


def json_safe(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def to_json(value, indent: int | None = None) -> str:
    return json.dumps(json_safe(value), indent=indent, allow_nan=False)


class Totals:
    """Running sums for summary.json over the whole run: restored from the checkpoint a
    run resumes from (``--resume`` or an elastic restart), so summary.json counts every
    step that made the final weights once, whatever the attempts."""

    def __init__(self, state: dict | None = None) -> None:
        state = state or {}
        self.steps: int = state.get("steps", 0)
        self.images: int = state.get("images", 0)
        self.comm_wait_s: float = state.get("comm_wait_s", 0.0)
        self.bytes: dict[str, int] = dict(state.get("bytes", {}))
        self.calls: dict[str, int] = dict(state.get("calls", {}))     # collectives by "tag/op"
        self.skipped: int = state.get("skipped_steps", 0)
        self.eval_s: float = state.get("eval_s", 0.0)         # in test evaluations
        self.checkpoint_s: float = state.get("checkpoint_s", 0.0)
        self.prior_wall_s: float = state.get("wall_s", 0.0)   # earlier attempts' share
        self.attempts: int = state.get("attempts", 0) + 1

    def add(self, images: int, comm: dict) -> None:
        self.steps += 1
        self.images += images
        self.comm_wait_s += comm["comm_wait_s"]
        for tag, n in comm["bytes"].items():
            self.bytes[tag] = self.bytes.get(tag, 0) + n
        for key, n in comm.get("calls", {}).items():
            self.calls[key] = self.calls.get(key, 0) + n

    def state(self, wall: float) -> dict:
        """What a checkpoint stores; ``wall``: this attempt's seconds so far."""
        return {"steps": self.steps, "images": self.images, "comm_wait_s": self.comm_wait_s, "bytes": self.bytes,
                "calls": self.calls,
                "skipped_steps": self.skipped, "wall_s": self.prior_wall_s + wall, "attempts": self.attempts,
                "eval_s": self.eval_s, "checkpoint_s": self.checkpoint_s}

    def summary(self, wall: float) -> dict:
        """summary.json's counters; ``wall``: this attempt's seconds (earlier ones are added)."""
        wall += self.prior_wall_s
        steps = max(1, self.steps)
        train = max(0.0, wall - self.eval_s - self.checkpoint_s)   # images/s counts training alone
        return {"wall_s": wall, "train_s": train, "eval_s": self.eval_s, "checkpoint_s": self.checkpoint_s,
                "images_per_s": self.images / train if train else 0.0,
                "bytes_per_step": {tag: n / steps for tag, n in self.bytes.items()},
                "bytes_per_step_total": sum(self.bytes.values()) / steps,
                "collectives_per_step": {key: n / steps for key, n in self.calls.items()},
                "collectives_per_step_total": sum(self.calls.values()) / steps,
                "comm_wait_fraction": self.comm_wait_s / train if train else 0.0,
                "skipped_steps": self.skipped, "attempts": self.attempts}


class RunLog:
    """metrics.jsonl and summary.json in the run directory (worker 0 only).

    A fresh run starts an empty metrics.jsonl; a run continuing from step N
    (``resumed_at=N``) keeps the records up to step N and drops later ones, which the
    steps it is about to redo will write again: each step appears once. ``attach=True``
    appends to the file another process of the same run started.
    """

    def __init__(self, out: Path, enabled: bool, resumed_at: int | None = None, attach: bool = False,
                 tensorboard: bool = False) -> None:
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        self.board = None
        if not enabled:
            return
        if tensorboard:  # the same scalars as metrics.jsonl, for `tensorboard --logdir RUN/tensorboard`
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=resumed_at)
        if attach:
            return
        Path(out).mkdir(parents=True, exist_ok=True)
        kept = _records_up_to(self.path, resumed_at) if resumed_at is not None else []
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(to_json(record) + "\n")
            if self.board is not None:
                self._scalars(record)

    def _scalars(self, record: dict) -> None:
        kind, step = record.get("kind", "train"), record["step"]
        for key, value in record.items():
            if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.board.add_scalar(f"{kind}/{key}", value, step)
        for tag, value in (record.get("bytes") or {}).items():
            self.board.add_scalar(f"{kind}/bytes/{tag}", value, step)
        self.board.flush()

    def summary(self, out: Path, summary: dict) -> None:
        if self.enabled:
            atomic_write_text(Path(out) / "summary.json", to_json(summary, indent=2))


RECORD_START = '{"kind": '   # how every line RunLog writes begins (its records put "kind" first)


@dataclass
class Records:
    """What :func:`read_records` found in a metrics.jsonl: its records, and the numbers
    (from 1, as editors count) of the lines that are not records, cut or damaged."""

    path: Path
    lines: int = 0
    records: list[dict] = field(default_factory=list)
    cut: list[int] = field(default_factory=list)         # begun like a record, not finished: a crash mid-write
    damaged: list[int] = field(default_factory=list)     # anything else that is not a record

    def cut_note(self) -> str | None:
        """One line saying which lines a crash cut short, or None."""
        if not self.cut:
            return None
        if self.cut == [self.lines]:
            return f"{self.path}: its last line was cut (a crash mid-write)"
        return f"{self.path}: line {self.cut[0]}{_more(self.cut)} was cut (a crash mid-write)"

    def damage(self) -> str | None:
        """One line naming the first line that is neither a record nor a cut one, or None."""
        if not self.damaged:
            return None
        return f"{self.path} line {self.damaged[0]}{_more(self.damaged)} is not a metrics record"


def _more(numbers: list[int]) -> str:
    return f" (and {len(numbers) - 1} more)" if len(numbers) > 1 else ""


def _is_record(value) -> bool:
    """A dict with a ``kind`` and an integer ``step``: what :class:`RunLog` writes."""
    if not isinstance(value, dict):
        return False
    step = value.get("step")
    return isinstance(value.get("kind"), str) and isinstance(step, int) and not isinstance(step, bool)


def read_records(path: Path) -> Records:
    """The records of the metrics.jsonl at ``path``, in file order, and where it is cut or
    damaged. A line that begins as RunLog's do (:data:`RECORD_START`) and does not parse
    was cut by a crash (the next attempt's lines may follow it). Bytes that are not UTF-8
    read as U+FFFD: a garbage file shows as damaged lines, not as a decoding error."""
    text = Path(path).read_text(errors="replace")
    lines = text.split("\n")   # by newline alone, as RunLog writes them (and editors number them)
    if lines[-1] == "":
        lines.pop()
    found = Records(Path(path), lines=len(lines))
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if _is_record(record):
            found.records.append(record)
        elif record is None and line.startswith(RECORD_START):
            found.cut.append(number)
        elif line.strip():
            found.damaged.append(number)
    return found


def _records_up_to(path: Path, step: int) -> list[str]:
    """The lines of ``path`` whose step is at most ``step``, for a resumed run. Lines a
    crash cut, and damaged ones, are dropped with one line each on stderr: the run goes on."""
    if not path.is_file():
        return []
    found = read_records(path)
    for note in (found.cut_note(), found.damage()):
        if note:
            _warn(f"{note}; dropped")
    return [to_json(r) for r in found.records if r["step"] <= step]


def _warn(message: str) -> None:
    """One line on stderr: a worker's console is the user's (no logging is configured there)."""
    print(f"onetrick: warning: {message}", file=sys.stderr, flush=True)
