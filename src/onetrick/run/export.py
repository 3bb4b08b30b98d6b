"""Reading a run back: plain state_dict export, offline evaluation, filters for plots."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from onetrick.config import TrainConfig
from onetrick.run import checkpoint
from onetrick.run.checkpoint import UNREADABLE


def _latest(run: Path) -> Path:
    found = checkpoint.candidates(run)
    if not found:
        raise checkpoint.CheckpointError(f"no checkpoint in {checkpoint.checkpoint_root(run)}")
    return found[0]


def full_state(run: Path) -> dict[str, torch.Tensor]:
    """The newest readable checkpoint's model weights, unsharded, whatever strategy and
    worker count wrote them (a truncated checkpoint is skipped for the previous one)."""
    errors = []
    for path in checkpoint.candidates(run):
        with tempfile.TemporaryDirectory() as tmp:
            flat = Path(tmp) / "state.pt"
            try:
                dcp_to_torch_save(path, flat)
                return torch.load(flat, weights_only=True)["model"]
            except UNREADABLE as err:
                errors.append(f"{path.name}: {type(err).__name__}")
    raise checkpoint.CheckpointError(f"no readable checkpoint in {checkpoint.checkpoint_root(run)} ({'; '.join(errors) or 'none found'})")


def export_record(run: Path) -> dict:
    """What ``onetrick export`` writes: the newest checkpoint's weights and how to rebuild
    the model, ``{"model", "num_classes", "in_channels", "image_size", "state_dict"}``."""
    from onetrick.models import input_size

    state = full_state(run)
    meta = checkpoint.read_meta(_latest(run))
    name = meta["model"]
    convs = [t for t in state.values() if t.ndim == 4]  # the first one is the first convolution
    size = run_config(run).image_size or (None if name.startswith("custom:") else input_size(name))
    return {"model": name, "num_classes": meta["num_classes"], "in_channels": convs[0].shape[1] if convs else None,
            "image_size": size, "state_dict": state}


def export_run(run: Path, output: Path | None = None) -> Path:
    """Write :func:`export_record` to ``output`` (default ``RUN/model.pt``); read it back
    with :func:`onetrick.load`, or take its ``state_dict`` for ``load_state_dict``."""
    _latest(run)  # a missing run is the first thing to say
    output = Path(output or Path(run) / "model.pt")
    if output.is_dir():
        raise checkpoint.CheckpointError(f"-o {output} is a directory; give a file name")
    if not output.parent.is_dir():
        raise checkpoint.CheckpointError(f"-o {output}: folder {output.parent} does not exist")
    torch.save(export_record(run), output)
    return output


def run_config(run: Path) -> TrainConfig:
    summary = Path(run) / "summary.json"
    meta = checkpoint.read_meta(_latest(run))
    if summary.exists():
        try:
            saved = json.loads(summary.read_text())["config"]
            fields = {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise checkpoint.CheckpointError(f"unreadable {summary}: not a onetrick summary") from None
        fields["out"] = Path(fields.get("out", run))
        fields["lr_drops"] = tuple(fields.get("lr_drops", ()))
        return TrainConfig(**fields)
    return TrainConfig(model=meta["model"], out=Path(run))


def evaluate_run(run: Path, views: int = 1, data: str | None = None) -> dict:
    """Top-1/top-5 test error of a run's newest checkpoint, in this process."""
    from onetrick.data import build_data
    from onetrick.distributed.runtime import Runtime
    from onetrick.distributed.strategy import SingleStrategy
    from onetrick.models import build_model, input_size
    from onetrick.run.evaluate import evaluate

    cfg = run_config(run).replace(eval_views=views, workers=1, strategy="single", scheme=None, fc_batch="full")
    if data:
        cfg = cfg.replace(data=data)
    bundle = build_data(cfg.data, image_size=cfg.image_size or input_size(cfg.model), seed=cfg.seed)
    model = build_model(cfg.model, num_classes=bundle.num_classes, in_channels=bundle.in_channels, dropout=cfg.dropout)
    try:
        model.load_state_dict(full_state(run))
    except RuntimeError:
        raise checkpoint.CheckpointError(f"the checkpoint in {run} does not fit {cfg.model!r} on {bundle.name} "
                                         f"({bundle.num_classes} classes, {bundle.in_channels} channel(s)); "
                                         "was it trained on other data?") from None
    strategy = SingleStrategy(model, cfg, Runtime(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None))
    return evaluate(strategy, bundle, cfg)


def first_layer_weight(run: Path) -> torch.Tensor:
    """The first convolution's filters (out, in, kh, kw)."""
    for tensor in full_state(run).values():
        if tensor.ndim == 4:
            return tensor
    raise ValueError(f"no convolution weights in {run}")
