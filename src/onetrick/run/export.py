"""Reading a run back: plain state_dict export, offline evaluation, filters for plots.

Every reader takes the newest checkpoint that can be read (:func:`newest_weights`: one
that cannot is skipped, left as it is, and named in one line for the reader to show) and,
where it rebuilds the model, rebuilds it as the run did, whatever strategy and worker
count wrote it (:func:`run_config`: the run's recorded configuration, and the classifier
as wide as the checkpoint holds it).
"""
from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from onetrick.config import TrainConfig
from onetrick.run import checkpoint, rundir
from onetrick.run.checkpoint import UNREADABLE

Notify = Callable[[str], None]


@dataclass(frozen=True)
class Weights:
    """A checkpoint's model weights, unsharded, and which checkpoint gave them."""

    path: Path
    meta: dict
    state: dict[str, torch.Tensor]
    skipped: list[tuple[Path, str]] = field(default_factory=list)   # newer ones that could not be read

    @property
    def step(self) -> int:
        return self.meta["step"]

    def tell(self, done: str, on_skip: Notify | None) -> None:
        """Pass ``on_skip`` the one line naming the newer checkpoints skipped, if any."""
        if self.skipped and on_skip is not None:
            on_skip(checkpoint.fallback_note(self.skipped, self.path, done))


def _latest(run: Path) -> Path:
    found = checkpoint.candidates(run)
    if not found:
        raise checkpoint.CheckpointError(f"no checkpoint in {checkpoint.checkpoint_root(run)}")
    return found[0]


def newest_weights(run: Path) -> Weights:
    """The newest readable checkpoint's model weights, whatever strategy and worker count
    wrote them; one with a file missing or cut short (meta.json too) is skipped for the
    previous one. CheckpointError (one line) if none can be read."""
    skipped: list[tuple[Path, str]] = []
    for path, meta, why in checkpoint.survey(run):
        if why is None:
            try:
                return Weights(path, meta, _unsharded(path), skipped)
            except UNREADABLE as err:
                why = checkpoint.first_line(err)
        skipped.append((path, why))
    raise checkpoint.nothing_to_load(run, skipped)


def _unsharded(path: Path) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "state.pt"
        dcp_to_torch_save(path, flat)
        return torch.load(flat, weights_only=True)["model"]


def full_state(run: Path) -> dict[str, torch.Tensor]:
    """The newest readable checkpoint's model weights (:func:`newest_weights`)."""
    return newest_weights(run).state


def export_record(run: Path, on_skip: Notify | None = None) -> dict:
    """What ``onetrick export`` writes: the newest readable checkpoint's weights, its step
    and how to rebuild the model, ``{"model", "num_classes", "in_channels", "image_size",
    "step", "state_dict"}``. ``on_skip`` hears of newer checkpoints that could not be read."""
    from onetrick.models import input_size

    weights = newest_weights(run)
    weights.tell("exported", on_skip)
    cfg, name, state = run_config(run, weights.meta), weights.meta["model"], weights.state
    convs = [t for t in state.values() if t.ndim == 4]  # the first one is the first convolution
    linears = [t for t in state.values() if t.ndim == 2]  # the last one is the classifier
    size = cfg.image_size or (None if name.startswith("custom:") else input_size(name))
    return {"model": name, "num_classes": cfg.classes or (linears[-1].shape[0] if linears else None),
            "in_channels": convs[0].shape[1] if convs else None, "image_size": size, "step": weights.step,
            "state_dict": state}


def export_run(run: Path, output: Path | None = None, on_skip: Notify | None = None) -> Path:
    """Write :func:`export_record` to ``output`` (default ``RUN/model.pt``); read it back
    with :func:`onetrick.load`, or take its ``state_dict`` for ``load_state_dict``.

    The file is written beside ``output`` under a temporary name and renamed over it, so
    an existing ``output`` is replaced whole or not at all; a write that fails (a full
    disk, a read-only folder) is one CheckpointError line and leaves nothing behind. It is
    serialized in memory first: torch.save reports a failed write to a file as a bare
    RuntimeError ("unexpected pos"), without the reason a plain write gives."""
    _latest(run)  # a missing run is the first thing to say
    output = Path(output or Path(run) / "model.pt")
    if output.is_dir():
        raise checkpoint.CheckpointError(f"-o {output} is a directory; give a file name")
    if not output.parent.is_dir():
        raise checkpoint.CheckpointError(f"-o {output}: folder {output.parent} does not exist")
    serialized = io.BytesIO()
    torch.save(export_record(run, on_skip), serialized)
    partial = output.with_name(f".{output.name}.partial")
    try:
        partial.write_bytes(serialized.getbuffer())
        partial.replace(output)
    except OSError as err:
        partial.unlink(missing_ok=True)   # there only if this process could create it, so it can remove it
        kept = "; the existing file is unchanged" if output.exists() else ""
        raise checkpoint.CheckpointError(f"cannot write {output}: {err.strerror or err}{kept}") from None
    return output


def run_config(run: Path, meta: dict) -> TrainConfig:
    """The configuration ``run`` was trained with, as far as rebuilding its model needs:
    summary.json's, else run.json's (a run stopped before its summary), else the model's
    name alone; the classifier as wide as the checkpoint's ``meta`` records it (``--classes``
    included), the model the one it names."""
    fields = _recorded_fields(run)
    fields.update(model=meta["model"], out=Path(fields.get("out") or run), lr_drops=tuple(fields.get("lr_drops") or ()))
    cfg = TrainConfig(**fields)
    return cfg.replace(classes=meta["num_classes"]) if meta.get("num_classes") else cfg


def _recorded_fields(run: Path) -> dict:
    summary = Path(run) / "summary.json"
    if not summary.exists():
        saved = rundir.saved_config(run)
    else:
        try:
            saved = json.loads(summary.read_text())["config"]
            saved.items()
        except (ValueError, KeyError, TypeError, AttributeError):
            raise checkpoint.CheckpointError(f"unreadable {summary}: not a onetrick summary") from None
    return {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}


def evaluate_run(run: Path, views: int = 1, data: str | None = None, on_skip: Notify | None = None) -> dict:
    """Top-1/top-5 test error of a run's newest readable checkpoint, in this process, and
    the ``step`` it scored; the model is rebuilt as the run built it (:func:`run_config`).
    ``on_skip`` hears of newer checkpoints that could not be read."""
    from onetrick.distributed.runtime import Runtime
    from onetrick.distributed.strategy import SingleStrategy
    from onetrick.run.evaluate import evaluate
    from onetrick.run.worker_setup import run_data

    weights = newest_weights(run)
    weights.tell("scored", on_skip)
    cfg = run_config(run, weights.meta).replace(eval_views=views, workers=1, strategy="single", scheme=None,
                                                fc_batch="full")
    if data:
        cfg = cfg.replace(data=data)
    bundle = run_data(cfg)
    model = _rebuilt(run, cfg, bundle, weights)
    strategy = SingleStrategy(model, cfg, Runtime(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None))
    return {**evaluate(strategy, bundle, cfg), "step": weights.step}


def _rebuilt(run: Path, cfg: TrainConfig, bundle, weights: Weights) -> torch.nn.Module:
    """``cfg``'s model for ``bundle`` holding ``weights``; one line if they do not fit."""
    from onetrick.models import build_model

    try:
        model = build_model(cfg.model, num_classes=bundle.num_classes, in_channels=bundle.in_channels,
                            dropout=cfg.dropout)
    except ValueError as err:   # a model of the user's own: onetrick.load(run, model=...) reads it
        raise checkpoint.CheckpointError(f"cannot rebuild the model of {run}: {err}") from None
    saved = {key: tuple(t.shape) for key, t in weights.state.items()}
    differs = checkpoint.compare(saved, model.state_dict(), whole="")
    try:
        if differs is None:
            model.load_state_dict(weights.state)
    except RuntimeError as err:
        differs = checkpoint.first_line(err)
    if differs is not None:
        raise checkpoint.CheckpointError(f"the checkpoint step {weights.step} in {run} does not fit {cfg.model!r} on "
                                         f"{bundle.name} ({bundle.num_classes} classes, {bundle.in_channels} "
                                         f"channel(s)): {differs}; was it trained on other data?")
    return model


def first_layer_weight(run: Path) -> torch.Tensor:
    """The first convolution's filters (out, in, kh, kw)."""
    for tensor in full_state(run).values():
        if tensor.ndim == 4:
            return tensor
    raise ValueError(f"no convolution weights in {run}")
