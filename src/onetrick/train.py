"""The training loop: short, flat, the same for every strategy.

Each worker runs :func:`train_worker`; the strategy decides what a step means (which
examples, which collectives, which updates). Worker 0 writes ``metrics.jsonl``,
``summary.json`` and the progress bar.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import checkpoint
from .config import TrainConfig
from .data import DataBundle, build_data
from .distributed import parallelize
from .distributed.runtime import Runtime, launch
from .distributed.strategy import StepStats, Strategy
from .evaluate import evaluate
from .models import build_model, input_size
from .recipe import schedule_factor, set_lr


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss (``--on-nan stop``)."""


def check_finite(seen: dict, cfg: TrainConfig) -> None:
    """Under ``--on-nan stop``, stop at the first read after a non-finite loss: reads come
    every ``--log-every`` steps and before every checkpoint, so none is ever written."""
    if seen["nonfinite_steps"] and cfg.on_nan == "stop":
        raise NonFiniteLoss(f"non-finite loss at step {seen['first_nonfinite_step']}; "
                            f"weights left at the last checkpoint in {cfg.out}")


def train(cfg: TrainConfig) -> dict:
    """Validate, launch the workers, return worker 0's summary. The CLI's ``train``."""
    cfg.validate()
    if cfg.resume:
        checkpoint.check_compatible(cfg.out, cfg.model)
    if cfg.strategy == "hogwild":
        from .distributed.hogwild import train_hogwild

        return train_hogwild(cfg)
    if cfg.strategy == "paramserver":
        from .distributed.paramserver import train_paramserver

        return train_paramserver(cfg)
    results = launch(train_worker, cfg)
    return results[min(results)] if 0 not in results else results[0]


def setup(rt: Runtime, cfg: TrainConfig) -> tuple[DataBundle, Strategy]:
    """Data and the parallelised model; identical initial weights on every worker."""
    size = cfg.image_size or input_size(cfg.model)
    data = build_data(cfg.data, image_size=size, seed=cfg.seed, skip_corrupt=cfg.skip_corrupt)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels, dropout=cfg.dropout)
    return data, parallelize(model, cfg, rt)


def steps_per_epoch(data: DataBundle, cfg: TrainConfig) -> int:
    return max(1, len(data.train) // (cfg.batch * cfg.data_parallel_degree))


def total_steps(data: DataBundle, cfg: TrainConfig) -> int:
    return cfg.steps or max(1, math.ceil(cfg.epochs * steps_per_epoch(data, cfg)))


def train_batches(data: DataBundle, cfg: TrainConfig, strategy: Strategy, start_step: int):
    """Yield ``(epoch, images, targets)`` from ``start_step`` on.

    Epoch e is a permutation seeded by (seed, e); worker r of K reads every K-th example
    of it, so the K*B examples of global step i are those one worker of batch K*B reads
    (the equivalence the tests rely on). Resuming skips consumed batches by index.
    """
    per_epoch = steps_per_epoch(data, cfg)
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler = DistributedSampler(data.train, num_replicas=strategy.data_world, rank=strategy.data_rank,
                                     shuffle=True, seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
        indices = list(sampler)[skip * cfg.batch:per_epoch * cfg.batch]
        loader = DataLoader(data.train, batch_size=cfg.batch, sampler=indices, drop_last=True,
                            num_workers=data.loader_workers, persistent_workers=False,
                            generator=torch.Generator().manual_seed(cfg.seed + epoch),
                            pin_memory=cfg.device == "cuda")
        for images, targets in loader:
            yield epoch, images, targets
        epoch, skip = epoch + 1, 0


def restart_count() -> int:
    """How many times torch elastic has restarted this job (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _maybe_crash(step: int, rank: int) -> None:
    """Testing hook: ONETRICK_CRASH_AT=STEP[:RANK] SIGKILLs this worker after that step
    of the first attempt, as a power cut would (no cleanup, no checkpoint)."""
    spec = os.environ.get("ONETRICK_CRASH_AT")
    if spec and restart_count() == 0:
        at, _, who = spec.partition(":")
        if step == int(at) and rank == int(who or 0):
            os.kill(os.getpid(), signal.SIGKILL)


def layer_stats(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """cuda-convnet2's per-layer log: |w| (RMS) and |dw|/|w| for the last update."""
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("weight") and name in before:
            w = p.detach().float()
            rms = w.pow(2).mean().sqrt().item()
            dw = (w - before[name]).pow(2).mean().sqrt().item()
            out[name] = {"w": rms, "dw_over_w": dw / rms if rms else 0.0}
    return out


def weights_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


class Totals:
    """Running sums over the steps this process ran, for summary.json."""

    def __init__(self) -> None:
        self.steps, self.images, self.comm_wait_s = 0, 0, 0.0
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def add(self, images: int, comm: dict) -> None:
        self.steps += 1
        self.images += images
        self.comm_wait_s += comm["comm_wait_s"]
        for tag, n in comm["bytes"].items():
            self.bytes[tag] = self.bytes.get(tag, 0) + n
        for key, n in comm["calls"].items():
            self.calls[key] = self.calls.get(key, 0) + n

    def summary(self, wall: float) -> dict:
        steps = max(1, self.steps)
        return {"wall_s": wall, "images_per_s": self.images / wall if wall else 0.0,
                "bytes_per_step": {tag: n / steps for tag, n in self.bytes.items()},
                "bytes_per_step_total": sum(self.bytes.values()) / steps,
                "collectives_per_step": {key: n / steps for key, n in self.calls.items()},
                "collectives_per_step_total": sum(self.calls.values()) / steps,
                "comm_wait_fraction": self.comm_wait_s / wall if wall else 0.0}


class RunLog:
    """metrics.jsonl and summary.json in the run directory (worker 0 only)."""

    def __init__(self, out: Path, enabled: bool, resume: bool) -> None:
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        if enabled:
            Path(out).mkdir(parents=True, exist_ok=True)
            if not resume:
                self.path.write_text("")

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    def summary(self, out: Path, summary: dict) -> None:
        if self.enabled:
            checkpoint.atomic_write_text(Path(out) / "summary.json", json.dumps(summary, indent=2))


def train_worker(rt: Runtime, cfg: TrainConfig) -> dict:
    data, strategy = setup(rt, cfg)
    total = total_steps(data, cfg)
    step = 0
    # After a crash, torch elastic restarts every worker (--max-restarts): pick up the
    # newest checkpoint, so at most the steps since it are lost.
    restarted = restart_count() > 0 and checkpoint.latest_meta(cfg.out) is not None
    resuming = cfg.resume or restarted
    if resuming:
        state = strategy.state_dict()
        step, _ = checkpoint.load(cfg.out, state)  # fills `state` in place, restores RNG
        strategy.load_state_dict(state)
    else:
        torch.manual_seed(cfg.seed * 1000 + strategy.data_rank + 1)  # augmentation/dropout stream per data shard
    log = RunLog(cfg.out, rt.is_main, resuming)
    meta = {"model": cfg.model, "strategy": cfg.strategy, "workers": cfg.workers, "num_classes": data.num_classes}
    bar = tqdm(total=total, initial=step, disable=not (cfg.progress and rt.is_main), desc="train", unit="step",
               mininterval=1.0, dynamic_ncols=True)
    totals = Totals()
    start_time = interval_start = time.perf_counter()
    interval_images = 0
    test = {}
    batches = train_batches(data, cfg, strategy, step)
    stats = StepStats(rt.device)  # loss/errors summed on the device, read on log and checkpoint steps
    strategy.set_training(True)
    while step < total:
        _, images, targets = next(batches)
        logging_now = (step + 1) % cfg.log_every == 0 or step + 1 == total
        before = weights_copy(strategy.model) if logging_now and rt.is_main else {}
        set_lr(strategy.optimizers(), schedule_factor(cfg, step, total))
        out = strategy.train_step(images.to(rt.device, non_blocking=True), targets.to(rt.device, non_blocking=True))
        stats.add(out, step)
        step += 1
        checkpoint_now = step % cfg.ckpt_every == 0 or step == total
        if logging_now or checkpoint_now:
            seen = stats.read()
            check_finite(seen, cfg)
        _maybe_crash(step, rt.rank)
        bar.update(1)
        interval_images += out.count
        comm = strategy.comm.take()
        totals.add(out.count, comm)
        if logging_now:
            now = time.perf_counter()
            record = {"kind": "train", "step": step, "epoch": step / steps_per_epoch(data, cfg), "loss": seen["loss"],
                      "train_error": seen["train_error"], "skipped_steps": seen["nonfinite_steps"],
                      "lr": strategy.optimizers()[0].param_groups[0]["lr"],
                      "images_per_s": interval_images / (now - interval_start), "bytes": comm["bytes"],
                      "bytes_total": comm["bytes_total"], "calls": comm["calls"], "calls_total": comm["calls_total"],
                      "comm_wait_s": comm["comm_wait_s"]}
            if rt.is_main:
                record["layers"] = layer_stats(strategy.model, before)
            log.write(record)
            bar.set_postfix(loss=f"{seen['loss']:.3f}", err=f"{seen['train_error']:.3f}")
            interval_start, interval_images = now, 0
            stats.reset()
        if step % cfg.eval_every == 0 or step == total:
            test = evaluate(strategy, data, cfg)
            strategy.comm.take()  # evaluation's traffic is no step's
            log.write({"kind": "test", "step": step, "epoch": step / steps_per_epoch(data, cfg), **test})
            strategy.set_training(True)
        if checkpoint_now:
            checkpoint.save(cfg.out, step, strategy.state_dict(), meta)
    bar.close()
    if not test:  # resumed a run that had already finished
        test = evaluate(strategy, data, cfg)
    summary = {**test, "steps": step, **totals.summary(time.perf_counter() - start_time),
               "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()}}
    log.summary(cfg.out, summary)
    return summary
