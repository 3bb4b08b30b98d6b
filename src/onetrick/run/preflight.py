"""Checks that need the data or the model, run once in the launcher before any worker starts.

``TrainConfig.validate`` checks each option on its own. What it cannot see is how the
options meet the data and the model: a batch larger than the training set (zero steps
per epoch: the loop would wait forever for a batch), an image size the network cannot
take, a ``--lr-mult`` pattern that names no parameter, a run that cannot fit in this
machine's memory or cores, a run directory that cannot be written. Each becomes one
line here (:class:`~onetrick.config.ConfigError` or :class:`~onetrick.data.DataError`)
instead of a traceback, or a hang, inside K workers.

The model is built on PyTorch's ``meta`` device: shapes and parameter counts without
memory or arithmetic, so a 100,000-class head costs nothing to check.
"""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from onetrick.config import ConfigError, TrainConfig

if TYPE_CHECKING:
    from onetrick.run.source import Source

# More workers than this per CPU core only queue for the cores (and gloo's threads).
MAX_WORKERS_PER_CORE = 8


def check(cfg: TrainConfig, source: Source | None = None) -> None:
    """Raise a one-line ConfigError/DataError if the run cannot work; return quietly if it can.
    ``source``: a user's own model and data (:func:`onetrick.fit`), checked in place of
    ``--model``/``--data`` (``fit`` has already run one of its images through the model)."""
    if cfg.out is not None:  # None: a fresh directory under runs/ (rundir.prepare)
        check_run_directory(Path(cfg.out))
    check_cores(cfg)
    from onetrick.run.worker_setup import run_data

    data = source.data if source else run_data(cfg)
    if data.num_classes < 2:
        raise ConfigError(f"{data.name} has {data.num_classes} class; a classifier needs at least 2")
    check_batch(cfg, len(data.train), data.name)
    check_warmup(cfg, len(data.train))
    if source:
        model = source.model
    else:
        model = _meta_model(cfg, data.num_classes, data.in_channels)
        check_image_size(model, cfg, data.in_channels, data.image_size)
    check_lr_mult(model, cfg.lr_mult)
    check_memory(cfg, data, source.model if source else None)


def check_warmup(cfg: TrainConfig, train_examples: int) -> None:
    """``--warmup-epochs`` must end within the run (``validate`` checks it against
    ``--epochs``; against ``--steps`` it needs the data set's size)."""
    from onetrick.run.worker_setup import steps_per_epoch_of, total_steps_of

    warmup_steps = cfg.warmup_epochs * steps_per_epoch_of(train_examples, cfg)
    total = total_steps_of(train_examples, cfg)
    if warmup_steps > total:
        raise ConfigError(f"--warmup-epochs {cfg.warmup_epochs:g} is {warmup_steps:.0f} steps, longer than the run's {total}")


def check_run_directory(out: Path) -> None:
    """``--out`` must be a directory this process can create and write."""
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                what = "is a file" if parent == out else f"lies under the file {parent}"
                raise ConfigError(f"--out {out} {what}; give a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"--out {out}: {parent} is not writable")
            return


def check_cores(cfg: TrainConfig) -> None:
    from onetrick.distributed.runtime import under_torchrun

    cores = os.cpu_count() or 1
    limit = MAX_WORKERS_PER_CORE * cores
    if cfg.device == "cpu" and not under_torchrun() and cfg.process_count > limit:
        raise ConfigError(f"--workers {cfg.workers} is far beyond this machine's {cores} CPU cores (at most {limit} "
                          f"processes here); spread them over machines with torchrun")


def check_batch(cfg: TrainConfig, train_size: int, data_name: str) -> None:
    """A step needs ``batch`` examples on each data-parallel worker: at least one full step per epoch."""
    need = cfg.batch * cfg.data_parallel_degree
    if need > train_size:
        per = f" ({cfg.data_parallel_degree} workers x --batch {cfg.batch})" if cfg.data_parallel_degree > 1 else ""
        raise ConfigError(f"a step needs {need} training examples{per} but {data_name} has {train_size}; "
                          f"lower --batch")


def check_image_size(model: torch.nn.Module, cfg: TrainConfig, channels: int, size: int) -> None:
    """One example through the network on the meta device: the shapes must fit."""
    x = torch.empty(1, channels, size, size, device="meta")
    try:
        with torch.no_grad():
            model.eval()(x)
    except (RuntimeError, ValueError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--image-size {size} does not fit model {cfg.model!r} ({first})") from None


def check_lr_mult(model: torch.nn.Module, patterns: list[str]) -> None:
    names = [n for n, _ in model.named_parameters()]
    for item in patterns:
        glob = item.split("=", 1)[0]
        if not any(fnmatch.fnmatch(n, glob) for n in names):
            raise ConfigError(f"--lr-mult {item!r} matches no parameter; names look like {names[0]!r}")


def check_memory(cfg: TrainConfig, data, model: torch.nn.Module | None = None) -> None:
    """Refuse, in one line naming both figures, a run whose predicted peak memory per worker
    (:func:`onetrick.perf.predict.memory.predict_memory`: parameters, gradients, momentum,
    activations at the batch, communication buffers and the transient copies, the model
    on the meta device) exceeds what a worker has: ``--memory-per-worker``, or detected
    (CPU: this machine's available memory shared by its workers; CUDA: the GPU's memory).
    ``--strategy auto`` and ``--scheme auto`` are checked by the planner, which drops
    every plan that does not fit. ``model``: a user's own (:func:`onetrick.fit`)."""
    from onetrick.distributed.runtime import under_torchrun
    from onetrick.perf.measure.memory import available_memory, gb
    from onetrick.perf.predict.activations import NetMemory
    from onetrick.perf.predict.memory import predict_for_config, variant_of

    if cfg.strategy == "auto" or (cfg.strategy == "hybrid" and cfg.scheme == "auto"):
        return
    torchrun = under_torchrun()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if torchrun else cfg.process_count
    available, source = available_memory(cfg.device, local, local == 1 and not torchrun, cfg.memory_per_worker,
                                         here=True)
    if available is None:
        return
    try:
        net = NetMemory.from_model(model, data.image_size, data.in_channels) if model is not None else None
        pred = predict_for_config(cfg, data.num_classes, data.in_channels, data.image_size, net=net)
    except (ValueError, RuntimeError, NotImplementedError, TypeError):
        return   # a model the meta device cannot describe: nothing to check against
    if pred.total <= available:
        return
    what = f"--strategy {variant_of(cfg).label}" + (f" at {cfg.workers} workers" if cfg.workers > 1 else "")
    if cfg.strategy in ("single", "data", "hogwild", "paramserver"):
        hint = ("--strategy hybrid or model (the FC head sharded over the workers), fewer workers per machine, "
                "or a smaller --batch")
    else:
        hint = "more workers (each holds 1/K of the head), a smaller --batch, or fewer workers per machine"
    largest = sorted(((n, b) for n, b in pred.parts.items() if b), key=lambda x: -x[1])[:3]
    raise ConfigError(f"{what} needs {gb(pred.total)} per worker (predicted peak, at {pred.peak_phase}: "
                      + ", ".join(f"{n} {gb(b)}" for n, b in largest)
                      + f"), {gb(available)} available ({source}); try {hint}")


def _meta_model(cfg: TrainConfig, classes: int, channels: int) -> torch.nn.Module:
    from onetrick.models import meta_model

    return meta_model(cfg.model, num_classes=classes, in_channels=channels, dropout=cfg.dropout)
