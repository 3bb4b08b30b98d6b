"""What every asynchronous worker runs, Hogwild's (run/hogwild.py) and the parameter
server's (run/paramserver.py): :func:`worker_loop` (one worker's steps, logging and
periodic test error), :func:`async_summary` (summary.json with the synchronous loop's
keys), :func:`raise_if_failed` and :func:`run_meta` (a checkpoint's meta.json).

Testing hooks (environment variables, read by every asynchronous worker; not CLI options):
``ONETRICK_ASYNC_DELAY_MS=MAX`` sleeps a random 0..MAX ms before every step;
``ONETRICK_ASYNC_FAIL_AT=STEP[:WORKER]`` raises :class:`InjectedFailure` in that worker
(default 0) at that 0-based step; run/records.py's ``ONETRICK_CRASH_AT=STEP[:WORKER]`` SIGKILLs it.
"""
from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from onetrick.config import TrainConfig
from onetrick.data import DataBundle
from onetrick.distributed.hogwild import DataShard
from onetrick.distributed.runtime import WorkerFailure
from onetrick.distributed.strategy import StepOutput, StepStats, Strategy
from onetrick.recipe import schedule_factor
from onetrick.run import rundir
from onetrick.run.evaluate import evaluate
from onetrick.run.records import NonFiniteLoss, RunLog, Totals, layer_stats, maybe_crash, weights_copy
from onetrick.run.worker_setup import steps_per_epoch, total_steps, train_batches

DELAY_ENV = "ONETRICK_ASYNC_DELAY_MS"
FAIL_ENV = "ONETRICK_ASYNC_FAIL_AT"


class InjectedFailure(RuntimeError):
    """Raised in a worker by the ``ONETRICK_ASYNC_FAIL_AT`` testing hook."""


def run_meta(cfg: TrainConfig, data: DataBundle) -> dict:
    """A checkpoint's meta.json (the run id from the run.json worker 0 wrote at the start)."""
    return {"model": cfg.model, "strategy": cfg.strategy, "workers": cfg.workers, "servers": cfg.servers,
            "num_classes": data.num_classes, "run_id": rundir.run_id(cfg.out), "train_examples": len(data.train)}


def _inject_faults(step: int, index: int) -> None:
    """The testing hooks of the module docstring (random, not reproducible: that is the point)."""
    delay_ms = os.environ.get(DELAY_ENV)
    if delay_ms:
        time.sleep(random.uniform(0.0, float(delay_ms)) / 1000.0)
    spec = os.environ.get(FAIL_ENV)
    if spec:
        at, _, who = spec.partition(":")
        if step == int(at) and index == int(who or 0):
            raise InjectedFailure(f"injected failure at step {step}")


def _one_step(cfg: TrainConfig, strategy: Strategy, batches, step: int, index: int) -> StepOutput:
    _inject_faults(step, index)
    _, images, targets = next(batches)
    device = strategy.rt.device
    return strategy.train_step(images.to(device, non_blocking=True), targets.to(device, non_blocking=True))


def _read_stats(cfg: TrainConfig, stats: StepStats, index: int) -> dict:
    """One host-device sync, every --log-every steps: --on-nan stop stops here."""
    seen = stats.read()
    if seen["nonfinite_steps"] and cfg.on_nan == "stop":
        raise NonFiniteLoss(f"non-finite loss at step {seen['first_nonfinite_step']} of worker {index}")
    return seen


def worker_loop(cfg: TrainConfig, data: DataBundle, strategy: Strategy, index: int, log: RunLog,
                before_step: Callable[[int], None] | None = None, after_step: Callable[[int], None] | None = None,
                start: int = 0, totals: Totals | None = None,
                counted: Callable[[int, Totals], None] | None = None) -> dict:
    """Run asynchronous worker ``index``'s steps ``start..total_steps-1``; return its
    :class:`Totals` (continuing ``totals``, the counters so far, when resumed), start and
    end times and error.

    ``strategy`` is the worker's local learner: ``train_step`` computes the gradient of
    one batch and hands it to its optimizer (a real SGD step for Hogwild, an accumulator
    for the parameter server). ``before_step(step)`` / ``after_step(step)`` do the
    strategy's communication. An exception from the data or the step itself ends the
    loop and is returned as ``error`` (so the caller can tell the others); exceptions
    from the communication hooks propagate. ``counted(steps_done, totals)`` runs once a
    step is counted (Hogwild publishes its progress there). Worker 0 writes train lines,
    a test line every ``eval_every`` steps and the progress bar. A fresh worker seeds its
    augmentation/dropout stream; a resumed one keeps the RNG state its caller set.
    """
    total, per_epoch, is_main = total_steps(data, cfg), steps_per_epoch(data, cfg), index == 0
    if start == 0:
        torch.manual_seed(cfg.seed * 1000 + index + 1)  # as train_worker: one augmentation/dropout stream per shard
    batches = train_batches(data, cfg, DataShard(index, cfg.workers), start)  # resumed: the shard's position
    bar = tqdm(total=total, initial=start, disable=not (cfg.progress and is_main), desc=f"train ({cfg.strategy})", unit="step",
               mininterval=1.0, dynamic_ncols=True)
    result = {"index": index, "error": None, "start": time.monotonic(), "totals": totals or Totals()}
    interval = [result["start"], 0]  # start time and images of the current logging interval
    stats = StepStats(strategy.rt.device)  # summed on the device, read every --log-every steps
    strategy.set_training(True)
    for step in range(start, total):
        if before_step:
            before_step(step)
        read_now = (step + 1) % cfg.log_every == 0 or step + 1 == total
        logging_now = is_main and read_now
        before = weights_copy(strategy.named_weights()) if logging_now else {}
        try:
            out = _one_step(cfg, strategy, batches, step, index)
            stats.add(out, step)
            seen = _read_stats(cfg, stats, index) if read_now else {}
        except Exception as err:  # noqa: BLE001 - any training error: reported, the others carry on
            result["error"] = f"{type(err).__name__}: {err}"
            break
        if after_step:
            after_step(step)
        comm = strategy.comm.take()
        result["totals"].add(out.count, comm)
        interval[1] += out.count
        bar.update(1)
        if logging_now:
            now = time.monotonic()
            log.write({"kind": "train", "step": step + 1, "epoch": (step + 1) / per_epoch, "loss": seen["loss"],
                       "train_error": seen["train_error"],
                       "skipped_steps": result["totals"].skipped + seen["nonfinite_steps"],
                       "lr": cfg.lr * schedule_factor(cfg, step, total),
                       "images_per_s": interval[1] / (now - interval[0]), "bytes": comm["bytes"],
                       "bytes_total": comm["bytes_total"], "comm_wait_s": comm["comm_wait_s"],
                       "layers": layer_stats(strategy.named_weights(), before)})
            bar.set_postfix(loss=f"{seen['loss']:.3f}", err=f"{seen['train_error']:.3f}")
            interval[:] = [now, 0]
        if read_now:  # --on-nan skip (stop raised in _read_stats): counted, weights untouched
            result["totals"].skipped += seen["nonfinite_steps"]
            stats.reset()
        if counted:
            counted(step + 1, result["totals"])
        maybe_crash(step + 1, index)
        if is_main and (step + 1) % cfg.eval_every == 0 and step + 1 < total:  # the final one is the caller's
            log.write({"kind": "test", "step": step + 1, "epoch": (step + 1) / per_epoch, **evaluate(strategy, data, cfg)})
            strategy.set_training(True)
    result["end"] = time.monotonic()
    bar.close()
    return result


def _merged(parts: list[Totals], prior: dict) -> Totals:
    """All workers' totals as one, after the earlier attempts' ``prior`` wall time and
    count; comm wait averaged, so its fraction is per worker."""
    merged = Totals(prior)
    for t in parts:
        merged.add(t.images, {"comm_wait_s": t.comm_wait_s / len(parts), "bytes": t.bytes, "calls": t.calls})
    merged.steps = sum(t.steps for t in parts)
    merged.skipped = sum(t.skipped for t in parts)
    return merged


def async_summary(cfg: TrainConfig, test: dict, workers: list[dict], lost: list[str], extra: dict,
                  prior: dict | None = None) -> dict:
    """summary.json of an asynchronous run, with the synchronous loop's keys.

    ``workers``: what ``worker_loop`` returned, for the workers that returned; ``lost``:
    one line per worker that returned nothing. ``steps`` is the longest worker's step
    count, ``worker_steps`` each one's; ``wall_s`` runs from the first worker's start to
    the last one's end; ``images_per_s`` counts every worker's images; bytes are those a
    worker sends per step of its own, averaged over workers. ``prior``
    (``async_state.attempt_totals``): the earlier attempts' wall time and count.
    """
    wall = max((w["end"] for w in workers), default=0.0) - min((w["start"] for w in workers), default=0.0)
    steps = [w["totals"].steps for w in workers]
    return {
        "top1_error": test.get("top1_error"), "top5_error": test.get("top5_error"),
        "steps": max(steps, default=0), "worker_steps": steps,
        **_merged([w["totals"] for w in workers], prior or {}).summary(wall),
        **extra,
        "failed_workers": [f"worker {w['index']}: {w['error']}" for w in workers if w["error"]] + lost,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()},
    }


def raise_if_failed(summary: dict, cfg: TrainConfig) -> None:
    """After summary.json is written: :class:`WorkerFailure` if any worker failed, naming
    the first and counting those that finished (never "the others finished" when none did)."""
    failed = summary["failed_workers"]
    if not failed:
        return
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    finished = cfg.workers - len(failed)
    ended = f"{finished} of {cfg.workers} workers finished" if finished > 0 else "no worker finished"
    raise WorkerFailure(f"{failed[0]}{more}; {ended}, summary in {cfg.out}")
