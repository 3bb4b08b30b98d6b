"""Checks that need the data or the model, run once in the launcher before any worker starts.

``TrainConfig.validate`` checks each option on its own. What it cannot see is how the
options meet the data and the model: a ``--model`` or ``--data`` that names nothing, a
batch larger than the training set (zero steps per epoch: the loop would wait forever for
a batch), an image size the network cannot take, a ``--lr-mult`` pattern that names no
parameter, a ``--cut`` past the head, a run that cannot fit in this machine's memory or
cores, a run directory that cannot be written. Each becomes one line here
(:class:`~onetrick.config.ConfigError` or :class:`~onetrick.data.DataError`) instead of a
traceback, or a hang, inside K workers.

Every check reads one :class:`~onetrick.run.description.ModelDescription` of the run,
made once (the model on PyTorch's ``meta`` device: shapes and parameter counts without
memory or arithmetic, so a 100,000-class head costs nothing to check), which
:func:`check` returns for the planner and the memory prediction to read too.
"""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from onetrick.config import ConfigError, TrainConfig
from onetrick.run.description import ModelDescription, describe

if TYPE_CHECKING:
    from onetrick.run.source import Source

# More workers, or compute threads in all, than this per CPU core only queue for the
# cores (and gloo's threads); far beyond it the machine runs out of threads to start.
MAX_WORKERS_PER_CORE = 8


def check(cfg: TrainConfig, source: Source | None = None) -> ModelDescription:
    """Raise a one-line ConfigError/DataError if the run cannot work; return the run's
    description if it can. ``source``: a user's own model and data (:func:`onetrick.fit`),
    checked in place of ``--model``/``--data`` (``fit`` has already run one of its images
    through the model, and the workers check its ``--cut``)."""
    if cfg.out is not None:  # None: a fresh directory under runs/ (rundir.prepare)
        check_run_directory(Path(cfg.out))
    check_cores(cfg)
    desc = describe(cfg, source)
    if source is None:
        check_image_size(cfg, desc)
        check_cut(cfg, desc)
    if desc.classes < 2:
        raise ConfigError(f"{desc.data_name} has {desc.classes} class; a classifier needs at least 2")
    check_batch(cfg, desc.train_size, desc.data_name)
    check_warmup(cfg, desc.train_size)
    check_lr_mult(desc.model, cfg.lr_mult)
    check_memory(cfg, desc)
    return desc


def check_planned(cfg: TrainConfig, desc: ModelDescription) -> TrainConfig:
    """The planner's choice for ``--strategy``/``--scheme auto`` (``run/auto.py``), checked
    as the user's own would be where the planner changed it (the split of the work, its
    cut and its batch), against the same description: nothing rebuilt. Returns ``cfg``."""
    cfg.validate_parallelism()
    check_cut(cfg, desc)
    check_batch(cfg, desc.train_size, desc.data_name)
    return cfg


def check_cut(cfg: TrainConfig, desc: ModelDescription) -> None:
    """``--cut N`` leaves at least one of the head's Linear layers model-parallel."""
    if cfg.cut == 0:
        return
    linear = desc.head_linears
    if cfg.cut >= linear:
        raise ConfigError(f"--cut {cfg.cut} must be below the {linear} fully-connected layers of {cfg.model} "
                          f"(0..{linear - 1}; {linear} would be data parallelism: --strategy data)")


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
    """The workers this machine starts, and their ``--threads``, at most
    :data:`MAX_WORKERS_PER_CORE` per CPU core: ``--threads 100000`` would otherwise fail
    inside a worker, after launch (gloo: "Resource temporarily unavailable")."""
    from onetrick.distributed.runtime import under_torchrun

    cores = os.cpu_count() or 1
    limit = MAX_WORKERS_PER_CORE * cores
    torchrun = under_torchrun()
    if cfg.device == "cpu" and not torchrun and cfg.process_count > limit:
        raise ConfigError(f"--workers {cfg.workers} is far beyond this machine's {cores} CPU cores (at most {limit} "
                          f"processes here); spread them over machines with torchrun")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if torchrun else cfg.process_count
    if cfg.threads is not None and cfg.threads * local > limit:
        each = f" x {local} workers" if local > 1 else ""
        raise ConfigError(f"--threads {cfg.threads}{each} is far beyond this machine's {cores} CPU cores "
                          f"(at most {limit} threads in all here)")


def check_batch(cfg: TrainConfig, train_size: int, data_name: str) -> None:
    """A step needs ``batch`` examples on each data-parallel worker: at least one full step per epoch."""
    need = cfg.batch * cfg.data_parallel_degree
    if need > train_size:
        per = f" ({cfg.data_parallel_degree} workers x --batch {cfg.batch})" if cfg.data_parallel_degree > 1 else ""
        raise ConfigError(f"a step needs {need} training examples{per} but {data_name} has {train_size}; "
                          f"lower --batch")


def check_image_size(cfg: TrainConfig, desc: ModelDescription) -> None:
    """One example through the network on the meta device: the shapes must fit."""
    from onetrick.models.vision import PREFIX

    size = desc.image_size
    x = torch.empty(1, desc.channels, size, size, device="meta")
    try:
        with torch.no_grad():
            desc.model.eval()(x)
    except (RuntimeError, ValueError, IndexError, AssertionError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if cfg.model.startswith(PREFIX):   # models.check_model's line for torchvision's
            raise ConfigError(f"{cfg.model} does not run on {size}x{size} images: {first}") from None
        raise ConfigError(f"--image-size {size} does not fit model {cfg.model!r} ({first})") from None


def check_lr_mult(model: torch.nn.Module, patterns: list[str]) -> None:
    names = [n for n, _ in model.named_parameters()]
    for item in patterns:
        glob = item.split("=", 1)[0]
        if not any(fnmatch.fnmatch(n, glob) for n in names):
            raise ConfigError(f"--lr-mult {item!r} matches no parameter; names look like {names[0]!r}")


def check_memory(cfg: TrainConfig, desc: ModelDescription) -> None:
    """Refuse, in one line naming both figures, a run whose predicted peak memory per worker
    (:func:`onetrick.perf.predict.memory.predict_memory`: parameters, gradients, momentum,
    activations at the batch, communication buffers and the transient copies, the model
    as described on the meta device) exceeds what a worker has: ``--memory-per-worker``, or detected
    (CPU: this machine's available memory shared by its workers; CUDA: the GPU's memory).
    ``--strategy auto`` and ``--scheme auto`` are checked by the planner, which drops
    every plan that does not fit."""
    from onetrick.distributed.runtime import under_torchrun
    from onetrick.perf.measure.memory import available_memory, gb
    from onetrick.perf.predict.memory import predict_for_config, variant_of

    if cfg.strategy == "auto" or (cfg.strategy == "hybrid" and cfg.scheme == "auto") or desc.net is None:
        return
    torchrun = under_torchrun()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if torchrun else cfg.process_count
    available, source = available_memory(cfg.device, local, local == 1 and not torchrun, cfg.memory_per_worker,
                                         here=True)
    if available is None:
        return
    try:
        pred = predict_for_config(cfg, desc.classes, desc.channels, desc.image_size, net=desc.net)
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
