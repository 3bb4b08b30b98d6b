"""Run directories: one run each, never two mixed.

Before any worker starts, :func:`prepare` settles where a run writes:

- no ``--out``: a fresh ``runs/<YYYYmmdd-HHMMSS>`` (``-2``, ``-3`` if taken) and
  ``runs/latest`` becomes a symlink to it; ``--resume`` without ``--out`` continues
  ``runs/latest``'s target;
- ``--out DIR`` holding a run (any of onetrick's files: ``checkpoints/``,
  ``metrics.jsonl``, ``summary.json``, ``run.json``) is refused in one line, unless
  ``--resume`` continues it or ``--overwrite`` removes onetrick's files there first
  (files onetrick did not write are left alone);
- ``--resume`` needs a readable checkpoint that fits this run's model (its name, its
  classes, every weight's shape, read from DCP's index against the launch's description)
  and more steps than already done; a misfit is refused here, touching nothing.

Worker 0 then writes ``run.json`` (:func:`begin`): the run id, new for a fresh run and kept
across ``--resume`` and elastic restarts (every checkpoint's ``meta.json`` carries it, and
a restarted job resumes only checkpoints with its own id), and the run's configuration,
which ``eval`` rebuilds the model from when the run stopped before its summary.json.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from onetrick.config import ConfigError, TrainConfig
from onetrick.distributed.runtime import restart_attempt
from onetrick.run import checkpoint
from onetrick.run.checkpoint import CheckpointError, atomic_write_text
from onetrick.run.worker_setup import total_steps_of

if TYPE_CHECKING:
    from onetrick.run.description import ModelDescription

RUNS = Path("runs")
LATEST = "latest"
RUN_FILE = "run.json"
ASYNC = ("hogwild", "paramserver")
HOLDS_RUN = ("checkpoints", "metrics.jsonl", "summary.json", RUN_FILE)
# what --overwrite removes: the files above, their half-written forms, and export's default output
OWN_FILES = (*HOLDS_RUN, "metrics.jsonl.tmp", "summary.json.tmp", "run.json.tmp", "model.pt", "tensorboard", "error.log")


def prepare(cfg: TrainConfig, desc: ModelDescription | None = None) -> TrainConfig:
    """Check and settle the run directory before any worker starts; return ``cfg`` with
    ``out`` set. Raises ConfigError or CheckpointError with a one-line message. ``desc``:
    the launch's model, which a ``--resume``'s checkpoint must fit."""
    if cfg.out is None:
        cfg = cfg.replace(out=_resume_default() if cfg.resume else _fresh_default())
    out = Path(cfg.out)
    if cfg.resume:
        _check_resume(out, cfg, desc)
    elif restart_attempt() == 0 and holds_run(out):  # under torchrun, a restart finds its own run here
        if not cfg.overwrite:
            raise ConfigError(_refusal(out))
        remove_run(out)
    return cfg


def holds_run(out: Path) -> bool:
    return any((Path(out) / name).exists() for name in HOLDS_RUN)


def remove_run(out: Path) -> None:
    """``--overwrite``: delete onetrick's own files in ``out``, nothing else."""
    for name in OWN_FILES:
        path = Path(out) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def describe(out: Path) -> tuple[str, bool]:
    """``("smallnet, step 30", True)``: the run in ``out`` and whether a checkpoint exists."""
    meta = checkpoint.latest_meta(out)
    if meta is not None:
        return f"{meta.get('model', '?')}, step {meta.get('step', '?')}", True
    for name, key in ((RUN_FILE, "model"), ("summary.json", "config")):
        info = _read_json(Path(out) / name)
        model = info.get(key, {}).get("model") if key == "config" else info.get(key)
        if model:
            return f"{model}, no checkpoint", False
    return "no checkpoint", False


def _refusal(out: Path) -> str:
    what, resumable = describe(out)
    if resumable:
        return (f"--out {out} already holds a run ({what}); continue it with --resume, "
                "or start afresh with --overwrite (removes that run's files)")
    return (f"--out {out} already holds a run ({what}, nothing to resume); start afresh with --overwrite "
            "(removes that run's files) or choose another --out")


def _check_resume(out: Path, cfg: TrainConfig, desc: ModelDescription | None) -> None:
    """Touches nothing: a checkpoint this run does not fit is the configuration's fault."""
    if not out.is_dir():
        raise ConfigError(f"--resume given but run directory {out} does not exist")
    record = checkpoint.newest_record(out)   # the configuration first: whether its tensors read comes after
    if record is not None:
        _check_async_layout(out, record, cfg)
    fit = (desc.model, desc.classes) if desc is not None else ()
    meta = checkpoint.check_compatible(out, cfg.model, *fit)
    _check_async_layout(out, meta, cfg)
    if "train_examples" not in meta:  # a checkpoint from before this check: the worker stops at once instead
        return
    total = total_steps_of(meta["train_examples"], cfg)
    if total <= meta["step"]:
        raise CheckpointError(f"--resume: the run in {out} is at step {meta['step']} and this one would stop at "
                              f"step {total}; ask for more --steps or --epochs")


def _check_async_layout(out: Path, meta: dict, cfg: TrainConfig) -> None:
    """An asynchronous run's checkpoint holds one momentum per worker (Hogwild) or per
    server (parameter server): it resumes only with the same strategy and process counts,
    and a synchronous checkpoint does not resume as an asynchronous run."""
    strategies = {meta.get("strategy"), cfg.strategy}
    if not strategies & set(ASYNC):
        return
    same = meta.get("strategy") == cfg.strategy and meta.get("workers") == cfg.workers
    if cfg.strategy == "paramserver":
        same = same and meta.get("servers") == cfg.servers
    was = f"--strategy {meta.get('strategy')} --workers {meta.get('workers')}"
    if cfg.strategy == "paramserver" or meta.get("strategy") == "paramserver":
        was += f" --servers {meta.get('servers')}"
    if not same:
        raise CheckpointError(f"--resume: the checkpoint in {out} was written by {was}; "
                              "an asynchronous run resumes only with the same strategy and process counts")
    if "ranks" not in meta:
        raise CheckpointError(f"--resume: the checkpoint in {out} holds no {cfg.strategy} state "
                              "(written before asynchronous runs could resume)")


def _fresh_default() -> Path:
    """``runs/<now>`` (created), and ``runs/latest`` pointing at it."""
    from onetrick.distributed.runtime import under_torchrun

    if under_torchrun():
        raise ConfigError("under torchrun give --out DIR: every process must write to the same run directory")
    link = RUNS / LATEST
    if link.exists() and not link.is_symlink():
        raise ConfigError(f"{link} is a directory (an older onetrick's default run); move it away or give --out")
    RUNS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        name = stamp if n == 1 else f"{stamp}-{n}"
        try:
            (RUNS / name).mkdir()
        except FileExistsError:
            continue
        tmp = RUNS / f".{LATEST}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(name, tmp)
        os.replace(tmp, link)  # atomic: runs/latest never dangles
        return RUNS / name
    raise ConfigError(f"no free run directory name under {RUNS} for {stamp}")


def _resume_default() -> Path:
    link = RUNS / LATEST
    if not link.exists():
        raise ConfigError(f"--resume without --out continues {link}, which does not exist; give --out DIR")
    return RUNS / os.readlink(link) if link.is_symlink() else link


def begin(cfg: TrainConfig, fresh: bool) -> str:
    """Worker 0, before the first checkpoint: write ``run.json`` and return the run id.

    A fresh run gets a new id; a resumed or restarted one keeps the id in ``run.json``
    (or, in a directory without one, that of its newest checkpoint).
    """
    path = Path(cfg.out) / RUN_FILE
    info = {} if fresh else _read_json(path)
    if not info.get("run_id"):
        meta = None if fresh else checkpoint.latest_meta(cfg.out)
        info = {"run_id": (meta or {}).get("run_id") or uuid.uuid4().hex[:12], "model": cfg.model,
                "strategy": cfg.strategy, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    info.setdefault("config", config_record(cfg))
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(info, indent=2))
    return info["run_id"]


def config_record(cfg: TrainConfig) -> dict:
    """``cfg`` as JSON holds it (paths as strings)."""
    return json.loads(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()},
                                 default=str))


def saved_config(out: Path) -> dict:
    """The configuration run.json records (empty if none: a run from before it did)."""
    saved = _read_json(Path(out) / RUN_FILE).get("config")
    return saved if isinstance(saved, dict) else {}


def run_id(out: Path) -> str | None:
    """The id in ``out``'s run.json (None if there is none)."""
    return _read_json(Path(out) / RUN_FILE).get("run_id")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
