"""The Python API: your own model and data sets, every strategy, the whole training loop.

* :func:`fit` trains a model on K workers with everything ``onetrick train`` has
  (schedule, evaluation, checkpoints, metrics, progress bar, resume, every strategy) and
  leaves the trained weights in the model.
* :func:`parallelize` wraps a model for a loop of your own, inside a worker that
  ``torchrun`` started; :class:`~onetrick.distributed.strategy.Strategy` is the step API.
* :func:`load` rebuilds a model from an ``onetrick export`` file.

The model stays a plain ``nn.Module`` that knows nothing of parallelism; the strategies
need only know where its convolutional trunk ends (see :func:`~onetrick.models.as_trunk_head`).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from onetrick.config import ConfigError, TrainConfig
from onetrick.models import TrunkHeadNet, as_trunk_head, build_model, unshardable
from onetrick.run.source import Source, user_data

__all__ = ["fit", "load", "parallelize"]

_SHARDED_HEAD = ("model", "hybrid")


def fit(model: nn.Module, train_set: Dataset, test_set: Dataset, *, workers: int = 1, strategy: str | None = None,
        head: str | None = None, out: str | Path = "runs/fit", **options: Any) -> dict:
    """Train ``model`` on ``train_set`` with ``workers`` processes; return the run's summary.

    ``strategy``: single, data, model, hybrid (the default for 2+ workers), hogwild or
    paramserver. ``head``: the name of the child module where the fully-connected head
    starts, unless the model is a :class:`TrunkHeadNet` or has torchvision's
    ``features``/``classifier``. ``options``: any :class:`TrainConfig` field (``batch``,
    ``epochs``, ``lr``, ``scheme``, ``fc_batch``, ``resume``, ...). Data set items are
    ``(Tensor[C, H, W], int label)``. The run directory ``out`` gets ``metrics.jsonl``,
    ``summary.json`` and checkpoints, as with ``onetrick train``; afterwards ``model``
    holds the trained weights. With more than one worker the model and data sets travel
    to the workers pickled: define their classes at module level. Bad input raises
    :class:`ConfigError` (one line) before any worker starts.
    """
    net = _split(model, head)
    images, _ = train_set[0]
    if not (isinstance(images, torch.Tensor) and images.ndim == 3):
        raise ConfigError(f"train_set items must be (Tensor[C, H, W], label); got {type(images).__name__} "
                          f"of shape {tuple(getattr(images, 'shape', ()))}")
    strategy = strategy or ("single" if workers == 1 else "hybrid")
    _check_forward(model, net, images, head)
    cfg = _config(net, type(model).__name__, type(train_set).__name__, workers, strategy, out, options,
                  image_size=images.shape[-1])
    if cfg.eval_views != 1:
        raise ConfigError("eval_views must be 1 with your own test set (10-view testing needs the built-in data)")
    data = user_data(train_set, test_set, num_classes=_num_classes(net), in_channels=images.shape[0],
                     image_size=images.shape[-1], loader_workers=int(options.get("loader_workers", 0)))
    source = Source(net, data)
    if cfg.process_count > 1 or cfg.strategy == "hogwild":
        _check_picklable(source)
    from onetrick.run import checkpoint
    from onetrick.run.export import full_state
    from onetrick.run.train import train_validated

    if cfg.resume:
        checkpoint.check_compatible(cfg.out, cfg.model)
    summary = train_validated(cfg, source)   # validated once, by _config
    net.load_state_dict(full_state(cfg.out))  # net shares model's modules: model is trained
    return summary


def parallelize(model: nn.Module, strategy: str = "hybrid", *, head: str | None = None, **options: Any):
    """Wrap ``model`` for your own training loop in this worker; returns its Strategy.

    Call it in every worker of a ``torchrun`` job (or alone: one worker). The process
    group is joined if it is not yet; worker 0's initial weights are broadcast, so every
    worker starts equal. ``options``: :class:`TrainConfig` fields (``lr``, ``momentum``,
    ``scheme``, ``fc_batch``, ``device``, ...). The step API of the returned strategy:
    ``train_step(images, targets)`` (forward, backward, communication, update; returns
    ``StepOutput(loss, errors, count)`` over the global batch), ``logits(images)`` (every
    class's), ``top_classes(images, k)`` (the k best, without assembling a sharded head's logits),
    ``set_training(mode)``, ``data_rank``/``data_world`` (which shard of the data this
    worker reads), ``optimizers()`` (for a schedule), ``state_dict()`` /
    ``load_state_dict()`` (checkpoints) and ``full_state_dict()`` (unsharded weights,
    collective). Asynchronous strategies run their own loops: use :func:`fit`.
    Under ``model`` and ``hybrid`` the head's dense layers in ``model`` are moved to the
    meta device once this worker has copied its shard (a million-class head is not kept
    twice): use the strategy, or ``full_state_dict()``, from then on.
    """
    import torch.distributed as dist

    from onetrick.distributed import parallelize as wrap

    if strategy in ("hogwild", "paramserver"):
        raise ConfigError(f"strategy {strategy!r} runs its own asynchronous loop: use onetrick.fit")
    net = _split(model, head)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    cfg = _config(net, type(model).__name__, "custom", world, strategy, options.pop("out", "runs/parallelize"),
                  options, image_size=None)
    rt = _runtime(cfg)
    net.to(rt.device)
    if rt.world > 1:  # the same initial weights on every worker, whatever each one's seed
        with torch.no_grad():
            for tensor in net.state_dict().values():
                dist.broadcast(tensor, 0)
    return wrap(net, cfg, rt)


def load(path: str | Path, model: nn.Module | None = None, head: str | None = None) -> nn.Module:
    """The model in an ``onetrick export`` file (or a run directory's newest checkpoint).

    Built-in and torchvision models are rebuilt from the name, classes and input channels
    the export records, and returned in eval mode. A model of your own is not rebuilt:
    pass an untrained instance as ``model`` and its weights are loaded into it.
    """
    from onetrick.run.export import export_record

    path = Path(path)
    record = export_record(path) if path.is_dir() else torch.load(path, weights_only=True)
    if "state_dict" not in record:
        raise ConfigError(f"{path} is not an onetrick export (no state_dict)")
    if model is None:
        if str(record["model"]).startswith("custom:"):
            raise ConfigError(f"{path} holds your own model {record['model'][7:]}: pass an instance, load(path, model=...)")
        model = build_model(record["model"], record["num_classes"], record["in_channels"])
    _split(model, head).load_state_dict(record["state_dict"])
    return model.eval()


# -- helpers -----------------------------------------------------------------------------
def _split(model: nn.Module, head: str | None) -> TrunkHeadNet:
    try:
        return as_trunk_head(model, head)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_forward(model: nn.Module, net: TrunkHeadNet, images: torch.Tensor, head: str | None) -> None:
    """The split must compute what ``model.forward`` does (checked on one example)."""
    if net is model:
        return
    mode = model.training
    model.eval()
    try:
        with torch.no_grad():
            want, got = model(images[None]), net(images[None])
    except RuntimeError as err:
        raise ConfigError(f"trunk -> flatten -> head of {type(model).__name__} fails on a training image: "
                          f"{str(err).strip().splitlines()[0]}") from None
    finally:
        model.train(mode)
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-5):
        raise ConfigError(f"{type(model).__name__}.forward is not trunk -> flatten -> head split at "
                          f"{head or 'classifier'!r}: pass a TrunkHeadNet or another head=NAME")


def _config(net: TrunkHeadNet, model_name: str, data_name: str, workers: int, strategy: str, out: str | Path,
            options: dict, image_size: int | None) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    unknown = sorted(set(options) - set(fields) - {"loader_workers"})
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r}; the options are TrainConfig's fields")
    for reserved in ("model", "data", "workers", "strategy", "out"):
        if reserved in options:
            raise ConfigError(f"{reserved!r} is an argument of its own here, not an option")
    settings = {k: v for k, v in options.items() if k in fields}
    cfg = TrainConfig(model=f"custom:{model_name}", data=f"custom:{data_name}", workers=workers, strategy=strategy,
                      out=Path(out), image_size=image_size, **settings)
    cfg.validate()
    problem = unshardable(net.head) if strategy in _SHARDED_HEAD else None
    if problem:
        raise ConfigError(f"strategy {strategy}: {problem}")
    return cfg


def _num_classes(net: TrunkHeadNet) -> int:
    linears = [m for m in net.head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("the head has no nn.Linear layer: cannot tell the number of classes")
    return linears[-1].out_features


def _check_picklable(source: Source) -> None:
    try:
        pickle.dumps(source)
    except Exception as err:  # noqa: BLE001 - any pickling failure is the user's to fix, in one line
        raise ConfigError(f"the model and data sets must be picklable to reach the worker processes "
                          f"(define their classes at module level): {str(err).splitlines()[0]}") from None


def _runtime(cfg: TrainConfig):
    """This worker's Runtime: join torchrun's process group, or use the one already joined."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from onetrick.distributed.runtime import Runtime, init_worker

    if not dist.is_initialized():
        return init_worker(cfg)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cfg.device == "cuda" else torch.device("cpu")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("workers",))
    return Runtime(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=device, mesh=mesh)

