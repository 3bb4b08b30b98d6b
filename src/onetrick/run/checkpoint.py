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
the run id (``run.json`` of the run directory) and the run's running totals. Loading tries
the newest checkpoint first and falls back to older ones when a file is missing or
truncated; the unreadable one is renamed ``step_N.corrupt`` (kept for inspection, never
loaded, never counted by rotation).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

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
    dcp.save(state, checkpoint_id=tmp)
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


def _rotate(root: Path, keep: Path) -> None:
    """Delete all but the KEEP newest checkpoints; ``keep`` (the one just written) stays
    whatever its step."""
    others = sorted(p for p in root.glob("step_*[0-9]") if p != keep)
    for old in others[:max(0, len(others) - (KEEP - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def candidates(run_dir: Path, run_id: str | None = None) -> list[Path]:
    """Complete checkpoints (meta.json present), newest first; only run ``run_id``'s if given."""
    root = checkpoint_root(run_dir)
    found = sorted((p for p in root.glob("step_*[0-9]") if (p / "meta.json").exists()), reverse=True)
    return [p for p in found if run_id is None or _meta_run_id(p) == run_id]


def _meta_run_id(path: Path) -> str | None:
    try:
        return read_meta(path).get("run_id")
    except ValueError:  # a meta.json cut short: not a usable checkpoint of any run
        return None


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json; CheckpointError (one line) if it is not what we wrote."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"unreadable {path / 'meta.json'} ({type(err).__name__})") from None
    missing = [k for k in ("model", "step") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"{path / 'meta.json'} lacks {', '.join(missing)}: not a onetrick checkpoint")
    return meta


def latest_meta(run_dir: Path) -> dict | None:
    found = candidates(run_dir)
    return read_meta(found[0]) if found else None


def check_compatible(run_dir: Path, model: str) -> None:
    """Before any worker starts: the run directory's checkpoint must be of this model."""
    meta = latest_meta(run_dir)
    if meta is None:
        raise CheckpointError(f"--resume: no checkpoint found in {checkpoint_root(run_dir)}")
    if meta["model"] != model:
        raise CheckpointError(f"--resume: checkpoint in {run_dir} is of model {meta['model']!r}, not {model!r}")


def load(run_dir: Path, state: dict, run_id: str | None = None) -> tuple[int, Path]:
    """Load the newest readable checkpoint (of run ``run_id`` if given) into ``state`` in
    place (collective).

    Returns ``(step, path)``. A truncated or unreadable checkpoint is skipped for the
    previous one, and the same choice is made on every worker; worker 0 renames it
    ``step_N.corrupt`` so that rotation can never keep it over a good one.
    """
    errors = []
    for path in candidates(run_dir, run_id):
        ok = torch.tensor([1])
        try:
            dcp.load(state, checkpoint_id=path)
            restore_rng(path / f"rank{_rank():05d}.pt")
        except UNREADABLE as err:
            ok[0] = 0
            errors.append(f"{path.name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
        if dist.is_initialized():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item():
            return read_meta(path)["step"], path
        _set_aside(path)
    raise CheckpointError(f"no readable checkpoint in {checkpoint_root(run_dir)} ({'; '.join(errors) or 'none found'})")


def _set_aside(path: Path) -> None:
    """Rename an unreadable checkpoint ``step_N.corrupt`` once every worker is done with it."""
    barrier()
    if _rank() == 0:
        corrupt = path.with_name(path.name + ".corrupt")
        shutil.rmtree(corrupt, ignore_errors=True)
        os.replace(path, corrupt)
        newest = candidates(path.parent.parent)
        if newest:
            atomic_write_text(path.parent / "LATEST", newest[0].name)
        else:  # LATEST never names a checkpoint that is not there
            (path.parent / "LATEST").unlink(missing_ok=True)
    barrier()


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
