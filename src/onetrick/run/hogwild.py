"""A Hogwild run: the parent process and its K workers (the shared-memory mechanics, and
what Hogwild is, are distributed/hogwild.py's).

The parent process builds the model, starts the workers (torch.multiprocessing, spawn)
and watches them: a worker that raises or dies (even by SIGKILL) does not stop the
others, which run to the end; the parent then evaluates the shared weights, writes the
last test line, ``summary.json`` (``failed_workers`` lists the failures) and a final
checkpoint, and raises :class:`WorkerFailure` if any worker failed. Every worker builds
its data as every other process of a run does (``worker_setup.run_data``, or the user's
:class:`Source`) and runs ``async_loop.worker_loop``; worker 0 writes the train lines
and a test line every ``eval_every`` of its steps (on the shared weights as they are then).

Checkpoints and resume. Every ``--ckpt-every`` steps of worker 0 (and at the end) the
parent writes a checkpoint of a consistent cut (the :class:`Board` handshake; written
by ``async_state.Saver``): the shared weights (``model``), each worker's momentum
(``momentum/worker<i>``) and the counters (meta.json's ``ranks``, written last).
``--resume`` (also after the launcher itself died) loads all of it and every worker
continues from its own step, at its own position in its data shard. Hogwild's
interleaving is not deterministic, so a resumed run is equivalent to an uninterrupted
one, not bit-identical; a resumed worker also starts a fresh augmentation/dropout stream
(seeded from its step). A resume needs the same ``--workers``.
"""
from __future__ import annotations

import gc
import os
from queue import Empty

import torch
import torch.multiprocessing as mp

from onetrick.config import ConfigError, TrainConfig
from onetrick.distributed.hogwild import Board, local_config
from onetrick.distributed.runtime import Runtime, _threads, under_torchrun
from onetrick.distributed.strategy import SingleStrategy
from onetrick.recipe import schedule_factor, set_lr
from onetrick.run import rundir
from onetrick.run.async_loop import async_summary, raise_if_failed, run_meta, worker_loop
from onetrick.run.async_state import Saver, attempt_totals, load_latest
from onetrick.run.evaluate import evaluate
from onetrick.run.records import RunLog, Totals
from onetrick.run.source import Source
from onetrick.run.worker_setup import run_data, setup, steps_per_epoch, total_steps

POLL_S = 0.05         # how often the parent looks for finished or dead workers and checkpoint requests
JOIN_S = 10.0         # how long a finished worker may take to exit before it is terminated


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


def _resume(cfg: TrainConfig, model: torch.nn.Module, board: Board) -> tuple[int, dict]:
    """``--resume`` (rundir checked the worker count): the shared weights, every worker's
    momentum and counters, in place."""
    step, meta = load_latest(cfg, board.state(model))
    board.restore(meta["ranks"])
    return step, meta


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
        board.finished(index)  # a checkpoint need not wait for this worker any more
    del model, board
    gc.collect()  # the strategy's hooks and optimizer form cycles that hold the shared tensors
    if cfg.device == "cuda":
        torch.cuda.synchronize()
    queue.put(result)


def _hogwild_train(index: int, cfg: TrainConfig, model: torch.nn.Module, board: Board,
                   source: Source | None = None) -> dict:
    """Worker ``index``'s own learner on the shared weights and its shared momentum, from
    the step the board holds for it; its data built as every process of the run builds it."""
    torch.set_num_threads(_threads(cfg, cfg.workers))
    data = source.data if source is not None else run_data(cfg)
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
