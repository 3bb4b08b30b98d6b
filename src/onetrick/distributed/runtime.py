"""Launching workers and giving each its process group, device and mesh.

``launch`` is the only entry point: it runs ``fn(runtime, *args)`` on every worker and
returns the per-rank results. Started by hand it uses torch's elastic launcher (the API
behind ``torchrun``) to spawn the workers on this machine; started by ``torchrun`` it
joins the job torchrun made, unchanged, so the same command scales to many machines.
"""
from __future__ import annotations

import atexit
import ctypes
import inspect
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.multiprocessing.spawn import ProcessContext

from onetrick.config import TrainConfig

PR_SET_PDEATHSIG = 1        # linux/prctl.h
SHUTDOWN_GRACE_S = 2        # after a failure, seconds the others get to exit before SIGKILL (elastic's default: 30)
HEARTBEAT_EVERY_S = 1.0
STORE_CLIENT_TIMEOUT_S = 10  # the heartbeat's store calls give up after this
RESTART_CAUSE_ENV = "ONETRICK_RESTART_CAUSE"   # set by the launcher for a restarted attempt's workers


class WorkerFailure(RuntimeError):
    """A worker died or timed out; the message names the worker and the error."""


class PeerLost(RuntimeError):
    """Raised on a worker whose collective failed because another worker went silent."""


@dataclass
class Runtime:
    """What a worker knows about the job it belongs to."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None      # 1-D over all workers; None when running alone

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_initialized()


def package_pythonpath() -> str:
    """``PYTHONPATH`` for a fresh interpreter that must import this onetrick (a probe's or
    a network namespace's worker): the folder it is imported from, then the caller's."""
    root = str(Path(__file__).resolve().parents[2])   # above onetrick/distributed/
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def restart_attempt() -> int:
    """How many times torch elastic has restarted this job (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def announce_restart(rt: Runtime, step: int) -> None:
    """Worker 0 of a restarted attempt says so in one line: who failed and why (noted by
    our launcher, not by torchrun's), which restart of how many, and the step it resumes
    from, which only the workers know, once they have loaded their checkpoint."""
    attempt = restart_attempt()
    if not rt.is_main or attempt == 0:
        return
    cause = os.environ.get(RESTART_CAUSE_ENV, "a worker failed")
    most = os.environ.get("TORCHELASTIC_MAX_RESTARTS")
    print(f"onetrick: {cause}; restart {attempt}{f' of {most}' if most else ''} from step {step}",
          file=sys.stderr, flush=True)


def _threads(cfg: TrainConfig, local_world: int) -> int:
    return cfg.threads or max(1, (os.cpu_count() or 1) // local_world)


def init_worker(cfg: TrainConfig) -> Runtime:
    """Join the process group (gloo on CPU, NCCL on CUDA) with a timeout on every collective."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.set_num_threads(_threads(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if cfg.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=cfg.timeout_s)
    # device_id binds the group to this GPU at once (NCCL connects eagerly, and no
    # collective has to guess the device from the rank)
    bound = {"device_id": device} if device.type == "cuda" else {}
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, store=_attempt_store(rank, world, timeout), rank=rank, world_size=world,
                                timeout=timeout, **bound)
    else:  # one worker started by hand: a private store, no ports
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, **bound)
    atexit.unregister(_leave_group)   # once per process, however many runs it joins
    atexit.register(_leave_group)
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("workers",))
    return Runtime(rank=rank, world=world, local_rank=local_rank, device=device, mesh=mesh)


def _leave_group() -> None:
    """At exit, in a process that joined the group here and has not left it (a script's
    own loop through ``onetrick.parallelize``; the launcher's workers leave in
    :func:`_entry`): give gloo's threads a moment to drop the last collective's tensors
    while Python can still lend them the GIL, then leave the group. A thread that takes
    the GIL once the interpreter finalizes aborts the process (SIGABRT after a script that
    succeeded, under load: torch's open bug, pytorch#190489); atexit runs before that."""
    if dist.is_initialized():
        time.sleep(0.2)   # releases the GIL
        dist.destroy_process_group()


def _attempt_store(rank: int, world: int, timeout: timedelta) -> dist.Store:
    """The job's TCPStore, namespaced by restart attempt.

    After a torch elastic restart (``--max-restarts``) the rendezvous store still holds
    the previous attempt's gloo addresses; without a fresh namespace a restarted worker
    may read them and connect to a dead peer ("Connection refused") instead of its new one.
    """
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(host, port, world, is_master=rank == 0 and not agent_hosts_it, timeout=timeout,
                          multi_tenant=not agent_hosts_it)
    return dist.PrefixStore(f"onetrick/attempt_{restart_attempt()}", store)


class Heartbeat:
    """A counter each worker bumps every second in the job's store, from a thread of its
    own (so a worker busy computing still beats; a dead, stopped or hung process does not).

    When a collective fails, the failing worker asks which peers' counters stopped moving:
    those are the workers that stopped answering. Counters, not clocks: no clock skew
    between machines can fool it.
    """

    def __init__(self, store: dist.Store, rank: int, world: int) -> None:
        self.store, self.rank, self.world = store, rank, world
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="onetrick-heartbeat", daemon=True)

    @classmethod
    def start(cls, rank: int, world: int) -> Heartbeat | None:
        if world == 1 or "MASTER_ADDR" not in os.environ:
            return None
        try:
            client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                   timeout=timedelta(seconds=STORE_CLIENT_TIMEOUT_S))
        except (RuntimeError, ValueError):
            return None  # no heartbeat: failures are then named by the worker that saw them
        beat = cls(dist.PrefixStore(f"onetrick/heartbeat_{restart_attempt()}", client), rank, world)
        beat._thread.start()
        return beat

    def _beat(self) -> None:
        while not self._stopped.wait(HEARTBEAT_EVERY_S):
            try:
                self.store.add(str(self.rank), 1)
            except RuntimeError:
                return

    def _counts(self) -> list[int]:
        keys = [str(r) for r in range(self.world)]
        return [self.store.add(k, 0) if self.store.check([k]) else -1 for k in keys]

    def silent_peers(self) -> list[int]:
        """Ranks whose counter did not move over ``3 x HEARTBEAT_EVERY_S`` (this takes that long)."""
        try:
            before = self._counts()
            time.sleep(3 * HEARTBEAT_EVERY_S)
            after = self._counts()
        except RuntimeError:
            return []
        return [r for r in range(self.world) if r != self.rank and after[r] == before[r]]

    def stop(self) -> None:
        """Stop beating and wait for the thread to leave the store.

        A daemon thread still inside a store call when the interpreter finalizes is ended
        by Python from within that C++ call, which aborts the process (SIGABRT, "terminate
        called without an active exception"): a worker under torchrun, which exits through
        the interpreter's finalization, did so about once in ten runs on a loaded machine.
        """
        self._stopped.set()
        self._thread.join(timeout=STORE_CLIENT_TIMEOUT_S + 1)


@record
def _entry(fn: Callable[..., Any], cfg: TrainConfig, *args: Any) -> Any:
    _die_with_launcher()
    rank = int(os.environ.get("RANK", "0"))
    _maybe_freeze(rank)
    beat = Heartbeat.start(rank, int(os.environ.get("WORLD_SIZE", "1")))
    try:
        return fn(init_worker(cfg), cfg, *args)
    except Exception as err:
        lost = beat.silent_peers() if beat and _is_communication_error(err) else []
        if lost:  # name the worker that stopped answering, not this victim of it
            raise PeerLost(f"worker {', '.join(map(str, lost))} stopped answering (its heartbeat stopped; "
                           f"worker {rank} saw: {_first_line(err)})") from None
        raise
    finally:
        if beat:
            beat.stop()
        if dist.is_initialized():
            dist.destroy_process_group()


def _die_with_launcher() -> None:
    """Ask Linux to SIGKILL this worker when its launcher dies, so that no worker
    outlives it (a killed launcher would otherwise leave workers waiting on each other)."""
    if not sys.platform.startswith("linux") or under_torchrun():
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        return
    if os.getppid() == 1:  # the launcher died before the request was made
        os._exit(1)


def _maybe_freeze(rank: int) -> None:
    """Testing hook: ONETRICK_FREEZE_AT=SECONDS:RANK SIGSTOPs that worker SECONDS after it
    starts, as a hung machine would (alive, silent, holding its peers in a collective)."""
    spec = os.environ.get("ONETRICK_FREEZE_AT")
    if spec and restart_attempt() == 0:
        seconds, _, who = spec.partition(":")
        if rank == int(who or 0):
            timer = threading.Timer(float(seconds), os.kill, (os.getpid(), signal.SIGSTOP))
            timer.daemon = True
            timer.start()


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(err).__name__


def _is_communication_error(err: BaseException) -> bool:
    backend_error = getattr(dist, "DistBackendError", RuntimeError)
    text = str(err).lower()
    return isinstance(err, backend_error) or any(w in text for w in ("timed out", "timeout", "connection", "gloo"))


def _short_grace() -> None:
    """When a worker fails, torch's process context gives each other worker 30 s to exit
    after SIGTERM before SIGKILL; a stopped (SIGSTOP) or hung worker then holds the
    failure back for all of that. Our workers write nothing at exit that a checkpoint has
    not already made durable, so a few seconds are enough: make that the default grace."""
    join = ProcessContext.join
    if getattr(join, "onetrick_grace", False) or "grace_period" not in inspect.signature(join).parameters:
        return

    def _join(self, timeout=None, grace_period=None):
        return join(self, timeout, SHUTDOWN_GRACE_S if grace_period is None else grace_period)

    _join.onetrick_grace = True
    ProcessContext.join = _join


def _note_restart_causes() -> None:
    """Once per process, wrap torch elastic's worker monitor: when the group has failed
    (a restart follows if ``--max-restarts`` allows), note who failed and why in this
    launcher's environment, which the next attempt's workers inherit and whose worker 0
    says it (:func:`announce_restart`; elastic logs restarts at INFO, which we silence)."""
    monitor = getattr(LocalElasticAgent, "_monitor_workers", None)
    if monitor is None or getattr(monitor, "onetrick_causes", False):
        return

    def _monitor(self, worker_group):
        result = monitor(self, worker_group)
        if result.is_failed() and result.failures:
            os.environ[RESTART_CAUSE_ENV] = _describe(result.failures)
        return result

    _monitor.onetrick_causes = True
    LocalElasticAgent._monitor_workers = _monitor


def launch(fn: Callable[..., Any], cfg: TrainConfig, *args: Any, nprocs: int | None = None) -> dict[int, Any]:
    """Run ``fn(runtime, cfg, *args)`` on ``nprocs`` workers (default ``cfg.process_count``).

    Returns ``{rank: result}``. Raises :class:`WorkerFailure` with a one-line message if
    any worker fails (a crash, an exception, or a collective that timed out).
    """
    nprocs = nprocs or cfg.process_count
    if under_torchrun():
        return {int(os.environ["RANK"]): _entry(fn, cfg, *args)}
    if nprocs == 1:
        return {0: _entry(fn, cfg, *args)}
    _short_grace()
    _note_restart_causes()
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nprocs,
        run_id=f"onetrick-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0",
        max_restarts=cfg.max_restarts, monitor_interval=0.1, start_method="spawn",
    )
    # torch elastic logs each failed worker's whole traceback, and a Ctrl-C's "death signal";
    # one line is ours to print, the traceback goes to the run directory (or the console with
    # --debug). Each of its modules logs at a level of its own: setting the parent's is not enough.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.multiprocessing")):
            logging.getLogger(name).setLevel(logging.INFO if cfg.debug else logging.CRITICAL)
    if not cfg.debug:  # c10d's own C++ warnings (socket timeouts) repeat what our one line says
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    try:
        return elastic_launch(config, _entry)(fn, cfg, *args)
    except ChildFailedError as err:
        raise WorkerFailure(_describe(err.failures) + _out_of_restarts(cfg) + _keep_traceback(err, cfg)) from None
    except SignalException:  # Ctrl-C or SIGTERM to the launcher: the workers are already stopped
        raise KeyboardInterrupt from None
    finally:  # a later launch in this process (the API, a study) starts with no cause noted
        os.environ.pop(RESTART_CAUSE_ENV, None)


def _out_of_restarts(cfg: TrainConfig) -> str:
    """The failure's tail when ``--max-restarts`` ran out: a job fails only once it has."""
    n = cfg.max_restarts
    return f" after {n} restart{'s' if n != 1 else ''} (--max-restarts {n})" if n else ""


def _describe(failures: dict) -> str:
    """One line naming the worker that caused the failure (``failures``: torch elastic's
    ProcessFailure by rank): one killed by a signal first, else one whose peers report it
    silent, else the lowest rank that failed."""
    reasons = {rank: _reason(failure) for rank, failure in failures.items()}
    killed = [r for r, f in failures.items() if f.exitcode is not None and f.exitcode < 0]
    rank = min(killed) if killed else min(reasons, key=lambda r: (PeerLost.__name__ in reasons[r], r))
    reason = reasons[rank]
    if PeerLost.__name__ in reason:
        return reason.split(": ", 1)[1]
    return f"worker {rank} failed: {reason}"


def _reason(failure) -> str:
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", str(message))
    lines = [ln for ln in str(message).strip().splitlines() if ln.strip()]
    if failure.exitcode is not None and failure.exitcode < 0 and not lines:
        return f"killed by signal {-failure.exitcode}"
    return lines[-1] if lines else f"exit code {failure.exitcode}"


def _keep_traceback(err: ChildFailedError, cfg: TrainConfig) -> str:
    """Write every failed worker's traceback to RUN/error.log; say where, in a few words."""
    if cfg.debug or cfg.out is None:
        return ""
    out = Path(cfg.out)
    if not out.is_dir():
        return ""
    parts = []
    for rank, failure in sorted(err.failures.items()):
        message = failure.message
        if isinstance(message, dict):
            stack = message.get("extraInfo", {}).get("py_callstack")
            message = stack or message.get("message", str(message))
        parts.append(f"--- worker {rank} (exit code {failure.exitcode})\n{message}\n")
    try:
        (out / "error.log").write_text("".join(parts))
    except OSError:
        return ""
    return f" (traceback: {out / 'error.log'})"
