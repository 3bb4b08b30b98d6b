"""Checkpoints through torch.distributed.checkpoint (DCP), written atomically.

Layout of a run directory::

    checkpoints/step_00000200/   DCP files (each worker writes its own shards)
                 rank00000.pt    that worker's RNG states (exact resume)
                 meta.json       model, strategy, workers, step: written last
    checkpoints/LATEST           name of the newest complete checkpoint

A checkpoint is written into ``step_N.tmp`` and renamed by worker 0 once every worker
has finished, so a crash mid-write leaves the previous one intact; ``LATEST`` is
replaced with an atomic rename too and always names a checkpoint that exists: rotation
keeps the :data:`KEEP` newest and never the one just written. ``meta.json`` also holds
the run id (``run.json`` of the run directory) and the run's running totals.

Two ways a checkpoint can fail to load, never confused:

- it cannot be read (a file missing or cut short, which :func:`survey` sees in DCP's own
  index without reading a tensor, or a load that fails): it is skipped for the previous
  one, named in one line (``checkpoint step 8 is unreadable (...); resumed from step 4``)
  and left where it is, as it is (rotation neither counts nor deletes a damaged one);
- it can be read but does not fit the model (a tensor missing or of another shape,
  :func:`misfit`): that is the configuration's fault, not the checkpoint's, so it is
  refused in one line, before any worker starts where the run's record shows it
  (:func:`check_compatible`), else at load time, and nothing falls back.

Loading never renames, deletes or rewrites a checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata

KEEP = 2
# What a truncated or corrupt checkpoint raises. DCP's CheckpointException derives from
# BaseException, so ``except Exception`` alone would let it through.
UNREADABLE = (Exception, dcp.api.CheckpointException)


class CheckpointError(ValueError):
    """No usable checkpoint, or one that does not fit this run; one-line message."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every worker (nothing to wait for in one process)."""
    if dist.is_initialized():
        dist.barrier()


def save(run_dir: Path, step: int, state: dict, meta: dict) -> Path:
    """Collective: every worker calls it with its own (possibly sharded) ``state``."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        dcp.save(state, checkpoint_id=tmp, storage_writer=_slow_writer(tmp, step))
    except dcp.api.CheckpointException as err:   # DCP wraps a Ctrl-C in its save: it is one again
        if holds_interrupt(err):
            raise KeyboardInterrupt from None
        raise
    torch.save(rng_state(), tmp / f"rank{_rank():05d}.pt")
    barrier()
    if _rank() == 0:
        atomic_write_text(tmp / "meta.json", json.dumps({**meta, "step": step}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(root / "LATEST", final.name)
        _rotate(root, keep=final)
    barrier()
    return final


SLOW_SAVE_ENV = "ONETRICK_SLOW_SAVE_AT"


class _SlowWriter(dcp.FileSystemWriter):
    """DCP's own writer, which then lingers inside DCP's write step (see :func:`_slow_writer`)."""

    def __init__(self, path: Path, seconds: float) -> None:
        super().__init__(path)
        self.seconds = seconds

    def write_data(self, plan, planner):
        written = super().write_data(plan, planner)
        time.sleep(self.seconds)
        return written


def _slow_writer(path: Path, step: int) -> _SlowWriter | None:
    """Testing hook: ONETRICK_SLOW_SAVE_AT=STEP:SECONDS keeps the checkpoint of step STEP
    inside DCP's save for SECONDS after its files are written, so that a test's Ctrl-C
    lands where DCP catches it. None (DCP's default writer) otherwise."""
    at, _, seconds = os.environ.get(SLOW_SAVE_ENV, "").partition(":")
    return _SlowWriter(path, float(seconds or 60)) if at and int(at) == step else None


def holds_interrupt(err: BaseException) -> bool:
    """Whether a KeyboardInterrupt is among the failures DCP gathered into ``err`` (as
    ``(exception, traceback)`` pairs, one per failed worker), or behind one of them."""
    for failure, _ in getattr(err, "failures", {}).values():
        while failure is not None:
            if isinstance(failure, KeyboardInterrupt):
                return True
            failure = failure.__cause__ or failure.__context__
    return False


def _rotate(root: Path, keep: Path) -> None:
    """Delete all but the KEEP newest whole checkpoints; ``keep`` (the one just written)
    stays whatever its step. One that :func:`survey` finds damaged is neither counted nor
    deleted: it is the user's to inspect, and it never holds a good one's place."""
    whole = [path for path, _, why in survey(root.parent) if why is None and path != keep]
    for old in whole[KEEP - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def candidates(run_dir: Path, run_id: str | None = None) -> list[Path]:
    """Complete checkpoints (meta.json present), newest first; only run ``run_id``'s if given.
    Cheap: whether each can be read is :func:`survey`'s question."""
    root = checkpoint_root(run_dir)
    found = sorted((p for p in root.glob("step_*[0-9]") if (p / "meta.json").exists()), reverse=True)
    return [p for p in found if run_id is None or _meta_run_id(p) == run_id]


def _meta_run_id(path: Path) -> str | None:
    try:
        return read_meta(path).get("run_id")
    except ValueError:  # a meta.json cut short: not a usable checkpoint of any run
        return None


def survey(run_dir: Path, run_id: str | None = None) -> list[tuple[Path, dict | None, str | None]]:
    """Every checkpoint directory, newest first, as ``(path, meta, why)``: ``why`` names
    what makes it unreadable (a file missing or cut short), None if it looks whole, and
    ``meta`` is its meta.json where that can be read. Only run ``run_id``'s if given (one
    whose meta.json cannot be read stays in: whose it is cannot be told). Reads meta.json
    and DCP's index, never a tensor."""
    found = []
    for path in sorted(checkpoint_root(run_dir).glob("step_*[0-9]"), reverse=True):
        try:
            meta = _parse_meta(path)
        except CheckpointError as err:
            found.append((path, None, str(err)))
            continue
        if run_id is None or meta.get("run_id") == run_id:
            found.append((path, meta, _files_problem(path)))
    return found


def _files_problem(path: Path) -> str | None:
    """What DCP's index (``.metadata``) says is missing or cut short, None if nothing."""
    try:
        index = _dcp_index(path)
    except UNREADABLE as err:
        return f"unreadable .metadata ({type(err).__name__})"
    needed: dict[str, int] = {}
    for info in (index.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size < size:
            return f"{name} is cut short ({file.stat().st_size} of {size} bytes)"
    return None


def _dcp_index(path: Path) -> Metadata:
    """DCP's index of a checkpoint: every entry's shape, and where its bytes lie."""
    return dcp.FileSystemReader(path).read_metadata()


def _parse_meta(path: Path) -> dict:
    """meta.json, or a CheckpointError that names what is wrong with it (path relative)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"unreadable meta.json ({type(err).__name__})") from None
    missing = [k for k in ("model", "step") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"meta.json lacks {', '.join(missing)}: not a onetrick checkpoint")
    return meta


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json; CheckpointError (one line) if it is not what we wrote."""
    try:
        return _parse_meta(path)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None


def latest_meta(run_dir: Path) -> dict | None:
    """meta.json of the newest checkpoint that looks whole (None if there is none)."""
    return next((meta for _, meta, why in survey(run_dir) if why is None), None)


def newest_record(run_dir: Path) -> dict | None:
    """meta.json of the newest checkpoint whose meta.json reads, whole or not: the run's
    configuration as recorded, to compare before asking whether its tensors read."""
    return next((meta for _, meta, _ in survey(run_dir) if meta is not None), None)


def check_compatible(run_dir: Path, model: str, net: torch.nn.Module | None = None,
                     classes: int | None = None) -> dict:
    """Before any worker starts, touching nothing: the run's recorded configuration (the
    newest meta.json) and the newest whole checkpoint must be of ``model`` and of
    ``classes`` classes, and (given ``net``, the model as this run builds it, on the meta
    device) that checkpoint must hold each of its weights at its shape. Returns its meta.json."""
    found = survey(run_dir)
    whole = [(path, meta) for path, meta, why in found if why is None]
    for meta in [m for _, m, _ in found if m is not None][:1] + [m for _, m in whole][:1]:
        _check_record(run_dir, meta, model, classes)
    if not whole:
        raise nothing_to_load(run_dir, [(path, why) for path, _, why in found], "--resume: ")
    unfit = None if net is None else misfit(whole[0][0], {"model": net.state_dict()})
    if unfit:
        raise CheckpointError(f"--resume: {unfit}")
    return whole[0][1]


def _check_record(run_dir: Path, meta: dict, model: str, classes: int | None) -> None:
    if meta["model"] != model:
        raise CheckpointError(f"--resume: checkpoint in {run_dir} is of model {meta['model']!r}, not {model!r}")
    if classes is not None and meta.get("num_classes", classes) != classes:
        raise CheckpointError(f"--resume: the checkpoint in {run_dir} (step {meta['step']}) is of "
                              f"{meta['num_classes']} classes, this run of {classes}; resume with the "
                              "--data and --classes it was trained with")


def misfit(path: Path, state: dict) -> str | None:
    """Why ``state`` cannot be loaded from the checkpoint at ``path`` although it can be
    read (one line naming the first entry that differs), None if it fits. An index that
    cannot be read is no misfit: the load then says it is unreadable."""
    try:
        index = _dcp_index(path).state_dict_metadata
    except UNREADABLE:
        return None
    flat = dict(_flatten(state))
    whole = "model." if any(key.startswith("model.") for key in flat) else None
    differs = compare({key: getattr(md, "size", None) for key, md in index.items()}, flat, whole)
    return f"checkpoint step {step_of(path)} in {path.parent} does not fit this run: {differs}" if differs else None


def compare(saved: dict[str, tuple | None], wanted: dict, whole: str | None) -> str | None:
    """The first tensor of ``wanted`` that ``saved`` (shapes; None: not a tensor) lacks or
    holds at another shape; then, where ``whole`` is a key prefix under which ``wanted`` is
    the whole model, the first entry there that ``wanted`` lacks. None if they agree."""
    for key, value in wanted.items():
        if not isinstance(value, torch.Tensor):
            continue
        if key not in saved:
            return f"it holds no {key}"
        if saved[key] is not None and tuple(saved[key]) != tuple(value.shape):
            return f"{key} is {list(saved[key])} there, {list(value.shape)} here"
    extra = None if whole is None else next((k for k in saved if k.startswith(whole) and k not in wanted), None)
    return f"it holds {extra}, which this model lacks" if extra else None


def _flatten(state: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    """``(key, value)`` pairs as DCP names them: nested dicts' keys joined by dots."""
    for key, value in state.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def load(run_dir: Path, state: dict, run_id: str | None = None) -> tuple[int, Path]:
    """Load the newest readable checkpoint (of run ``run_id`` if given) into ``state`` in
    place (collective). Returns ``(step, path)``.

    Every worker makes the same choice. One that cannot be read is skipped for the
    previous one and named in one line on worker 0's stderr; none is renamed or deleted.
    One that can be read but does not fit ``state`` is a CheckpointError (one line), with
    no fall-back: an older one would not fit either.
    """
    skipped: list[tuple[Path, str]] = []
    for path, meta, why in survey(run_dir, run_id):
        why = _agreed(why)
        if why is None:
            why = _load_into(path, state)
        if why is None:
            if skipped and _rank() == 0:
                print(f"onetrick: warning: {fallback_note(skipped, path, 'resumed from')}", file=sys.stderr, flush=True)
            return meta["step"], path
        skipped.append((path, why))
    raise nothing_to_load(run_dir, skipped)


def _load_into(path: Path, state: dict) -> str | None:
    """Load ``path`` into ``state`` on every worker: None, or why it cannot be read (the
    same answer everywhere). CheckpointError if it does not fit."""
    unfit = _agreed(misfit(path, state))
    if unfit:
        raise CheckpointError(unfit)
    try:
        dcp.load(state, checkpoint_id=path)
        restore_rng(path / f"rank{_rank():05d}.pt")
        why = None
    except UNREADABLE as err:
        if holds_interrupt(err):   # Ctrl-C while loading: not a reason to fall back to an older checkpoint
            raise KeyboardInterrupt from None
        why = first_line(err)
    return _agreed(why)


def _agreed(note: str | None) -> str | None:
    """The first worker's note that is not None: one answer on every worker, so that all
    take the same checkpoint (and the same collectives)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return note
    notes: list = [None] * dist.get_world_size()
    dist.all_gather_object(notes, note)
    return next((n for n in notes if n is not None), None)


def first_line(err: BaseException) -> str:
    """One line for a failed read; DCP's CheckpointException holds the worker's own error."""
    failures = getattr(err, "failures", None)
    if failures:
        err = next(iter(failures.values()))[0]
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0][:160]}" if lines else type(err).__name__


def step_of(path: Path) -> str:
    """``step_00000008`` -> ``8``."""
    digits = path.name.removeprefix("step_")
    return str(int(digits)) if digits.isdigit() else path.name


def fallback_note(skipped: list[tuple[Path, str]], used: Path, done: str) -> str:
    """One line: the newer checkpoints that could not be read, why, and the one used
    (``done``: "resumed from", "scored", "exported")."""
    many = len(skipped) > 1
    steps = ", ".join(step_of(path) for path, _ in skipped)
    return (f"checkpoint{'s' if many else ''} step {steps} {'are' if many else 'is'} unreadable "
            f"({'; '.join(why for _, why in skipped)}); {done} step {step_of(used)}")


def nothing_to_load(run_dir: Path, skipped: list[tuple[Path, str]], prefix: str = "") -> CheckpointError:
    """The error when no checkpoint can be loaded: none there, or each one's reason."""
    root = checkpoint_root(run_dir)
    if not skipped:
        return CheckpointError(f"{prefix}no checkpoint in {root}")
    reasons = "; ".join(f"step {step_of(path)}: {why}" for path, why in skipped)
    return CheckpointError(f"{prefix}no readable checkpoint in {root} ({reasons})")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(path: Path) -> None:
    if not path.exists():  # resharded resume: another worker count, fresh RNG streams
        return
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
