"""The training loop: short, flat, the same for every synchronous strategy.

:func:`train` checks the options, the model and the data (``preflight``) and the run
directory (``rundir``), then chooses the loop: the asynchronous strategies run their own
(``run/hogwild.py``, ``run/paramserver.py``); every other strategy runs :func:`train_worker` on each
worker, and the strategy decides what a step means (which examples, which collectives,
which updates). What a run writes and counts lives in ``records``; the data and the
model every worker starts from in ``worker``. Worker 0 writes ``metrics.jsonl``,
``summary.json`` and the progress bar.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from onetrick.config import TrainConfig
from onetrick.distributed.runtime import Runtime, announce_restart, launch, restart_attempt
from onetrick.distributed.strategy import StepStats, Strategy
from onetrick.perf.measure.memory import gather_peaks, reset_peak
from onetrick.perf.predict.memory import predicted_for_run
from onetrick.recipe import schedule_factor, set_lr, warmup_progress
from onetrick.run import checkpoint, preflight, rundir
from onetrick.run.checkpoint import CheckpointError
from onetrick.run.evaluate import evaluate
from onetrick.run.records import NonFiniteLoss, RunLog, Totals, layer_stats, maybe_crash, weights_copy
from onetrick.run.source import Source
from onetrick.run.worker_setup import setup, steps_per_epoch, total_steps, train_batches


def train(cfg: TrainConfig, source: Source | None = None,
          on_run_dir: Callable[[Path], None] | None = None) -> dict:
    """Validate, check, settle the run directory, run the workers, return worker 0's summary.
    The CLI's ``train``; ``source`` (from :func:`onetrick.fit`) replaces ``cfg.model``
    and ``cfg.data``. Before any worker starts, the options are validated once, and the
    model is described once (``preflight.check``, ``run/description.py``): every check, the
    planner and the memory prediction read that description. ``on_run_dir`` is told the run
    directory once it is settled (the CLI's Ctrl-C line names it)."""
    return train_validated(cfg.validate(), source, on_run_dir)


def train_validated(cfg: TrainConfig, source: Source | None = None,
                    on_run_dir: Callable[[Path], None] | None = None) -> dict:
    """:func:`train` of a config already validated: :func:`onetrick.fit` validates its
    own among its other checks, and a launch validates once."""
    desc = preflight.check(cfg, source)
    if cfg.strategy == "auto" or cfg.scheme == "auto":   # planned once, here, before any worker starts
        from onetrick.run.auto import resolve_auto

        cfg = preflight.check_planned(resolve_auto(cfg, desc), desc)
    cfg = rundir.prepare(cfg, desc)
    if on_run_dir is not None:
        on_run_dir(cfg.out)
    if cfg.strategy == "hogwild":
        from onetrick.run.hogwild import train_hogwild

        return train_hogwild(cfg, source)
    if cfg.strategy == "paramserver":
        from onetrick.run.paramserver import train_paramserver

        return train_paramserver(cfg, source)
    predicted = predicted_for_run(cfg, desc.net) if source is None else None   # the cost model's figure, by part
    results = launch(train_worker, cfg, source, predicted)
    return results[min(results)] if 0 not in results else results[0]


def start(rt: Runtime, cfg: TrainConfig, strategy: Strategy) -> tuple[int, Totals, str]:
    """Where this attempt starts: ``(step, totals so far, run id)``.

    Worker 0 writes run.json first. ``--resume`` continues from the newest readable
    checkpoint; after an elastic restart (``--max-restarts``) every worker picks up this
    run's newest checkpoint (never another run's), so at most the steps since it are lost.
    """
    if rt.is_main:
        rundir.begin(cfg, fresh=not cfg.resume and restart_attempt() == 0)
    checkpoint.barrier()
    run_id = rundir.run_id(cfg.out)
    own = None if cfg.resume else run_id
    if not (cfg.resume or (restart_attempt() > 0 and checkpoint.candidates(cfg.out, own))):
        torch.manual_seed(cfg.seed * 1000 + strategy.data_rank + 1)  # augmentation/dropout stream per data shard
        return 0, Totals(), run_id
    state = strategy.state_dict()
    step, path = checkpoint.load(cfg.out, state, own)  # fills `state` in place, restores RNG
    strategy.load_state_dict(state)
    return step, Totals(checkpoint.read_meta(path).get("totals")), run_id


def train_record(step: int, seen: dict, comm: dict, per_epoch: int, lr: float, images_per_s: float) -> dict:
    """metrics.jsonl's line for a logged step, from one read of the device-side sums."""
    return {"kind": "train", "step": step, "epoch": step / per_epoch, "loss": seen["loss"],
            "train_error": seen["train_error"], "lr": lr, "images_per_s": images_per_s,
            "bytes": comm["bytes"], "bytes_total": comm["bytes_total"], "calls": comm["calls"],
            "calls_total": comm["calls_total"], "comm_wait_s": comm["comm_wait_s"]}


def check_finite(seen: dict, cfg: TrainConfig) -> None:
    """Under ``--on-nan stop``, stop at the first read after a non-finite loss: reads come
    every ``--log-every`` steps and before every checkpoint, so none is ever written."""
    if seen["nonfinite_steps"] and cfg.on_nan == "stop":
        where = "the last checkpoint in " + str(cfg.out) if checkpoint.candidates(cfg.out) else "no checkpoint (none was written yet)"
        raise NonFiniteLoss(f"non-finite loss at step {seen['first_nonfinite_step']}; weights left at {where}")


def train_worker(rt: Runtime, cfg: TrainConfig, source: Source | None = None, predicted: dict | None = None) -> dict:
    """One worker's run of a synchronous strategy; worker 0's summary carries ``predicted``
    (summary.json's ``predicted_memory``, computed by the launcher from its description)."""
    reset_peak(rt.device)   # this worker's own peak, from here (a one-worker run is the launcher's process)
    data, strategy = setup(rt, cfg, source)
    total, per_epoch = total_steps(data, cfg), steps_per_epoch(data, cfg)
    step, totals, run_id = start(rt, cfg, strategy)
    announce_restart(rt, step)   # after a worker died (--max-restarts): one line, by worker 0
    if step >= total:  # checkpoints too old to carry train_examples for rundir's check
        raise CheckpointError(f"--resume: the run in {cfg.out} is at step {step}; ask for more --steps or --epochs")
    log = RunLog(cfg.out, rt.is_main, resumed_at=step if step else None, tensorboard=cfg.tensorboard)
    meta = {"model": cfg.model, "strategy": cfg.strategy, "workers": cfg.workers, "num_classes": data.num_classes,
            "run_id": run_id, "train_examples": len(data.train)}
    bar = tqdm(total=total, initial=step, disable=not (cfg.progress and rt.is_main), desc="train", unit="step",
               mininterval=1.0, dynamic_ncols=True)
    start_time = interval_start = time.perf_counter()
    interval_images, test, step_times = 0, {}, []
    batches = train_batches(data, cfg, strategy, step)
    stats = StepStats(rt.device)  # loss/errors summed on the device, read on log and checkpoint steps
    strategy.set_training(True)
    while step < total:
        _, images, targets = next(batches)
        logging_now = (step + 1) % cfg.log_every == 0 or step + 1 == total
        before = weights_copy(strategy.named_weights()) if logging_now and rt.is_main else {}
        set_lr(strategy.optimizers(), schedule_factor(cfg, step, total), warmup_progress(cfg, step, per_epoch))
        step_start = time.perf_counter()
        out = strategy.train_step(images.to(rt.device, non_blocking=True), targets.to(rt.device, non_blocking=True))
        step_times.append(time.perf_counter() - step_start)
        stats.add(out, step)
        step += 1
        checkpoint_now = step % cfg.ckpt_every == 0 or step == total
        if logging_now or checkpoint_now:
            seen = stats.read()
            check_finite(seen, cfg)
        maybe_crash(step, rt.rank)
        bar.update(1)
        comm = strategy.comm.take()
        totals.add(out.count, comm)
        interval_images += out.count
        if logging_now:
            now = time.perf_counter()
            totals.skipped += seen["nonfinite_steps"]  # --on-nan skip: those steps left the weights as they were
            stats.reset()
            record = train_record(step, seen, comm, per_epoch, strategy.optimizers()[0].param_groups[0]["lr"],
                                  interval_images / (now - interval_start))
            record["skipped_steps"] = totals.skipped
            if rt.is_main:
                record["layers"] = layer_stats(strategy.named_weights(), before)
                before = {}   # the weights' copy (a whole model's worth): freed before the evaluation
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", err=f"{record['train_error']:.3f}")
            interval_start, interval_images = now, 0
        if step % cfg.eval_every == 0 or step == total:
            if step == total:
                bar.close()  # the bar counts training steps; the final evaluation is not one
            eval_start = time.perf_counter()
            test = evaluate(strategy, data, cfg)
            totals.eval_s += time.perf_counter() - eval_start
            strategy.comm.take()  # evaluation's traffic is no step's
            log.write({"kind": "test", "step": step, "epoch": step / per_epoch, **test})
            if rt.is_main and cfg.progress:
                bar.write(f"step {step}: test top-1 error {test['top1_error']:.2%}, top-5 {test['top5_error']:.2%}")
            strategy.set_training(True)
        if checkpoint_now:
            ckpt_start = time.perf_counter()
            meta["totals"] = totals.state(ckpt_start - start_time)
            if not logging_now:  # skipped steps read now but not yet logged
                meta["totals"]["skipped_steps"] += seen["nonfinite_steps"]
            checkpoint.save(cfg.out, step, strategy.state_dict(), meta)
            totals.checkpoint_s += time.perf_counter() - ckpt_start
    bar.close()
    if cfg.skip_corrupt:
        _report_skipped(rt, data)
    peaks = gather_peaks(rt.device)   # collective: every worker's peak, to worker 0's summary
    summary = {**test, "steps": step, **totals.summary(time.perf_counter() - start_time),
               "peak_memory_bytes": max(peaks), "peak_memory_bytes_per_worker": peaks,
               "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()}}
    if rt.is_main and source is None:   # the cost model's figure for this run, by part
        summary["predicted_memory"] = predicted
    if cfg.plan:   # --strategy/--scheme auto: the plan, its prediction and this run's measured step
        summary["plan"] = {**cfg.plan, "measured_step_ms": _median_ms(step_times[1:] or step_times)}
    log.summary(cfg.out, summary)
    return summary


def _report_skipped(rt: Runtime, data) -> None:
    """``--skip-corrupt``: after the one line per image, one line with the total, counted
    over every worker (collective: each worker flagged only the images of its own shard)."""
    mine = list(getattr(data.train, "skipped", []))
    everyone = [mine]
    if torch.distributed.is_initialized() and rt.world > 1:
        everyone = [None] * rt.world
        torch.distributed.all_gather_object(everyone, mine)
    paths = {path for part in everyone for path in part}
    if rt.is_main and paths:
        print(f"onetrick: warning: --skip-corrupt skipped {len(paths)} unreadable training image(s) in all",
              file=sys.stderr, flush=True)


def _median_ms(seconds: list[float]) -> float | None:
    ordered = sorted(seconds)
    return ordered[len(ordered) // 2] * 1e3 if ordered else None
