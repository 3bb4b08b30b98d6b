"""Hogwild: asynchronous data parallelism in shared memory (docs/PAPER.md form 3).

K worker processes on one machine (torch.multiprocessing, spawn) update one set of
weights held in shared memory (``model.share_memory()``), without locks. Each worker
reads its own shard of every epoch (``train_batches`` with data rank = worker index,
data world = K), keeps its own momentum, and applies its SGD step of batch B straight
into the shared tensors, so updates from different workers may interleave inside a
tensor: Hogwild's bet is that such conflicts cost less than any synchronisation. Each
update is one worker's batch, so the learning rate is not scaled with K. Asynchrony acts
as extra momentum (Mitliagkas et al. 2016, "Asynchrony begets momentum"): on top of the
recipe's 0.9, K=2 runs of the small network on digits often stall at chance, while
``--momentum 0.5`` trains them as well as synchronous SGD (the same holds for the
parameter server).

The parent process builds the model, starts the workers and watches them: a worker that
raises or dies (even by SIGKILL) does not stop the others, which run to the end; the
parent then evaluates the shared weights, writes the last test line, ``summary.json``
(``failed_workers`` lists the failures) and a final checkpoint, and raises
:class:`WorkerFailure` if any worker failed. Worker 0 writes the train lines and a test
line every ``eval_every`` of its steps (on the shared weights as they are then). Nothing
crosses a network: bytes per step are 0.

Checkpoints and resume. Each worker's momentum buffers live in shared memory too (the
parent allocates them and the worker's SGD updates them in place), next to a shared
table of every worker's counters (steps done, images, skipped steps): see
``async_state.Board``. Every ``--ckpt-every`` steps of worker 0 (and at the end) the
parent writes a checkpoint of a consistent cut: worker 0 asks for it, every live worker
pauses at its next step boundary (a worker that finished or died counts as paused, with
its state as it left it), the parent saves the shared weights (``model``), each
worker's momentum (``momentum/worker<i>``) and the counters (meta.json's ``ranks``,
written last), then releases them. ``--resume`` (also after the launcher itself died)
loads all of it and every worker continues from its own step, at its own position in
its data shard. Hogwild's interleaving is not deterministic, so a resumed run is
equivalent to an uninterrupted one, not bit-identical; a resumed worker also starts a
fresh augmentation/dropout stream (seeded from its step). A resume needs the same
``--workers``.

Also here, because the parameter server's workers run the same loop: :func:`worker_loop`
(one asynchronous worker's steps, logging and periodic test error) and
:func:`async_summary` (summary.json with the synchronous loop's keys).

Testing hooks (environment variables, read by every asynchronous worker; not CLI options):
``ONETRICK_ASYNC_DELAY_MS=MAX`` sleeps a random 0..MAX ms before every step;
``ONETRICK_ASYNC_FAIL_AT=STEP[:WORKER]`` raises :class:`InjectedFailure` in that worker
(default 0) at that 0-based step; run/records.py's ``ONETRICK_CRASH_AT=STEP[:WORKER]`` SIGKILLs it.
"""
from __future__ import annotations

import gc
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from queue import Empty

import torch
import torch.multiprocessing as mp
from tqdm import tqdm

from onetrick.config import ConfigError, TrainConfig
from onetrick.data import DataBundle, build_data
from onetrick.distributed.runtime import Runtime, WorkerFailure, _threads, under_torchrun
from onetrick.distributed.strategy import SingleStrategy, StepOutput, StepStats, Strategy
from onetrick.models import input_size
from onetrick.recipe import schedule_factor, set_lr
from onetrick.run import rundir
from onetrick.run.async_state import DONE, Board, Saver, attempt_totals, load_latest
from onetrick.run.evaluate import evaluate
from onetrick.run.records import NonFiniteLoss, RunLog, Totals, layer_stats, maybe_crash, weights_copy
from onetrick.run.source import Source
from onetrick.run.worker_setup import setup, steps_per_epoch, total_steps, train_batches

DELAY_ENV = "ONETRICK_ASYNC_DELAY_MS"
FAIL_ENV = "ONETRICK_ASYNC_FAIL_AT"
POLL_S = 0.05         # how often the parent looks for finished or dead workers and checkpoint requests
JOIN_S = 10.0         # how long a finished worker may take to exit before it is terminated


class InjectedFailure(RuntimeError):
    """Raised in a worker by the ``ONETRICK_ASYNC_FAIL_AT`` testing hook."""


@dataclass
class DataShard:
    """Which part of every epoch one asynchronous worker reads: the two things
    ``train_batches`` asks of a strategy."""

    data_rank: int
    data_world: int


def local_config(cfg: TrainConfig) -> TrainConfig:
    """The configuration of one asynchronous worker's own learner: a single process whose
    every update is its own batch B (no K-times batch, so no lr scaling) and which
    evaluates the whole test set alone."""
    return cfg.replace(strategy="single", workers=1)


def run_meta(cfg: TrainConfig, data: DataBundle) -> dict:
    """A checkpoint's meta.json (the run id from the run.json worker 0 wrote at the start)."""
    return {"model": cfg.model, "strategy": cfg.strategy, "workers": cfg.workers, "servers": cfg.servers,
            "num_classes": data.num_classes, "run_id": rundir.run_id(cfg.out), "train_examples": len(data.train)}


# -- one asynchronous worker ------------------------------------------------------------
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
                before_step=None, after_step=None, start: int = 0, totals: Totals | None = None,
                counted=None) -> dict:
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
    failed = summary["failed_workers"]
    if failed:
        raise WorkerFailure(f"{failed[0]}" + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else "")
                            + f"; the other workers finished, summary in {cfg.out}")


# -- the workers -----------------------------------------------------------------------------
def _hogwild_worker(index: int, cfg: TrainConfig, shared: list, queue, source: Source | None = None) -> None:
    """Body of worker process ``index``: train on the shared model with the shared
    momentum and counters (``shared`` holds the model and the :class:`Board`), put the
    result (or the setup error) on ``queue``.

    The model comes in a list that this worker empties: the Process object keeps its
    arguments until exit, and a CUDA tensor received from the parent must be freed here
    first, or the parent warns "Producer process has been terminated before all shared
    CUDA tensors released" (CUDA IPC counts the consumers' references)."""
    model, board = shared.pop(), shared.pop()
    try:
        result = _hogwild_train(index, cfg, model, board, source)
    except Exception as err:  # noqa: BLE001 - reported by the parent as this worker's failure
        result = {"index": index, "fatal": f"{type(err).__name__}: {err}"}
    finally:
        board.counters[index, DONE] = 1  # a checkpoint need not wait for this worker any more
    del model, board
    gc.collect()  # the strategy's hooks and optimizer form cycles that hold the shared tensors
    if cfg.device == "cuda":
        torch.cuda.synchronize()
    queue.put(result)


def _hogwild_train(index: int, cfg: TrainConfig, model: torch.nn.Module, board: Board,
                   source: Source | None = None) -> dict:
    torch.set_num_threads(_threads(cfg, cfg.workers))
    data = source.data if source is not None else build_data(
        cfg.data, image_size=cfg.image_size or input_size(cfg.model), seed=cfg.seed, skip_corrupt=cfg.skip_corrupt,
        train_examples=cfg.train_examples)
    device = torch.device(cfg.device)
    rt = Runtime(rank=index, world=cfg.workers, local_rank=index, device=device, mesh=None)
    strategy = SingleStrategy(model, local_config(cfg), rt)  # its own momentum, the shared weights
    for name, p in strategy.model.named_parameters():  # SGD updates a buffer it finds in place
        strategy.optimizer.state[p]["momentum_buffer"] = board.momentum[index][name]
    total = total_steps(data, cfg)
    start, images, skipped = board.ranks()[index].values()
    if start:  # resumed: a fresh augmentation/dropout stream, not the one the first attempt used
        torch.manual_seed((cfg.seed * 1000 + index + 1) * 100_003 + start)
    totals = Totals({"steps": start, "images": images, "skipped_steps": skipped})
    log = RunLog(cfg.out, index == 0, attach=True, tensorboard=cfg.tensorboard)  # the parent started the file

    def before_step(step: int) -> None:
        if index == 0 and step > start and step % cfg.ckpt_every == 0:
            board.request()
        board.pause_if_asked(index)
        set_lr(strategy.optimizers(), schedule_factor(cfg, step, total))

    def counted(done: int, totals: Totals) -> None:
        board.publish(index, done, totals.images, totals.skipped)

    return worker_loop(cfg, data, strategy, index, log, before_step=before_step, start=start, totals=totals,
                       counted=counted)


# -- the parent -------------------------------------------------------------------------------
def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by signal {-code}"
    return f"exited with code {code} without a result"


def _drain(queue, results: dict[int, dict]) -> None:
    """Everything already sent: a worker that exited has flushed its queue first."""
    while True:
        try:
            msg = queue.get(timeout=POLL_S)
        except Empty:
            return
        results[msg["index"]] = msg


def _collect(procs: list, queue, tick) -> tuple[dict[int, dict], dict[int, str]]:
    """Wait for every worker's result or death, whichever comes; never blocks on a dead
    one. ``tick()`` runs at every poll (the checkpoints)."""
    results: dict[int, dict] = {}
    lost: dict[int, str] = {}
    while len(results) + len(lost) < len(procs):
        tick()
        try:
            msg = queue.get(timeout=POLL_S)
            results[msg["index"]] = msg
            continue
        except Empty:
            pass
        for i, p in enumerate(procs):
            if p.exitcode is not None and i not in results and i not in lost:
                _drain(queue, results)
                if i not in results:
                    lost[i] = f"worker {i}: {_exit_reason(p.exitcode)}"
    for i, msg in list(results.items()):
        if "fatal" in msg:
            lost[i] = f"worker {i}: {results.pop(i)['fatal']}"
    return results, lost


def _run_workers(cfg: TrainConfig, model: torch.nn.Module, board: Board, saver: Saver,
                 source: Source | None) -> tuple[list[dict], list[str]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_hogwild_worker, args=(i, cfg, [board, model], queue, source), name=f"hogwild-{i}")
             for i in range(cfg.workers)]
    for p in procs:
        p.start()
    try:
        results, lost = _collect(procs, queue, lambda: saver.tick(procs))
    finally:
        for p in procs:  # finished workers exit at once; anything else is stopped
            p.join(timeout=JOIN_S)
            if p.is_alive():
                p.terminate()
                p.join()
        if cfg.device == "cuda":
            torch.cuda.ipc_collect()  # free what the workers' CUDA IPC handles kept alive
    return [results[i] for i in sorted(results)], [lost[i] for i in sorted(lost)]


def _resume(cfg: TrainConfig, model: torch.nn.Module, board: Board) -> tuple[int, dict]:
    """``--resume`` (rundir checked the worker count): the shared weights, every worker's
    momentum and counters, in place."""
    step, meta = load_latest(cfg, board.state(model))
    board.restore(meta["ranks"])
    return step, meta


def train_hogwild(cfg: TrainConfig, source: Source | None = None) -> dict:
    """Train with ``cfg.workers`` Hogwild processes on shared weights; return the summary.

    Raises :class:`WorkerFailure` (after writing summary.json) if a worker raised or died.
    """
    if under_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--strategy hogwild shares memory on one machine: start it with onetrick train, not torchrun")
    torch.set_num_threads(_threads(cfg, 1))
    rt = Runtime(rank=0, world=1, local_rank=0, device=torch.device(cfg.device), mesh=None)
    data, strategy = setup(rt, local_config(cfg), source)
    rundir.begin(cfg, fresh=not cfg.resume)
    board = Board(strategy.model, cfg.workers)
    resumed_at, meta = _resume(cfg, strategy.model, board) if cfg.resume else (None, None)
    strategy.model.share_memory()  # the workers' SGD steps write into these very tensors
    log = RunLog(cfg.out, True, resumed_at=resumed_at)
    prior = attempt_totals(meta)
    saver = Saver(cfg, run_meta(cfg, data), strategy.model, board, prior)
    workers, lost = _run_workers(cfg, strategy.model, board, saver, source)
    test = evaluate(strategy, data, cfg)
    steps = max((w["totals"].steps for w in workers), default=0)
    log.write({"kind": "test", "step": steps, "epoch": steps / steps_per_epoch(data, cfg), **test})
    summary = async_summary(cfg, test, workers, lost, extra={"resumed_from_step": resumed_at}, prior=prior)
    log.summary(cfg.out, summary)
    saver.save(max(r["steps"] for r in board.ranks()))  # the final state, dead workers' included
    raise_if_failed(summary, cfg)
    return summary
