"""Launching workers and giving each its process group, device and mesh.

``launch`` is the only entry point: it runs ``fn(runtime, *args)`` on every worker and
returns the per-rank results. Started by hand it uses torch's elastic launcher (the API
behind ``torchrun``) to spawn the workers on this machine; started by ``torchrun`` it
joins the job torchrun made, unchanged, so the same command scales to many machines.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from ..config import TrainConfig


class WorkerFailure(RuntimeError):
    """A worker died or timed out; the message names the worker and the error."""


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


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


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
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("workers",))
    return Runtime(rank=rank, world=world, local_rank=local_rank, device=device, mesh=mesh)


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
    return dist.PrefixStore(f"onetrick/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


@record
def _entry(fn: Callable[..., Any], cfg: TrainConfig, *args: Any) -> Any:
    rt = init_worker(cfg)
    try:
        return fn(rt, cfg, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nprocs,
        run_id=f"onetrick-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0",
        max_restarts=cfg.max_restarts, monitor_interval=0.1, start_method="spawn",
    )
    try:
        return elastic_launch(config, _entry)(fn, cfg, *args)
    except ChildFailedError as err:
        raise WorkerFailure(_describe(err)) from None


def _describe(err: ChildFailedError) -> str:
    rank, failure = min(err.failures.items())
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", str(message))
    lines = [ln for ln in str(message).strip().splitlines() if ln.strip()]
    reason = lines[-1] if lines else f"exit code {failure.exitcode}"
    if failure.exitcode is not None and failure.exitcode < 0 and not lines:
        reason = f"killed by signal {-failure.exitcode}"
    return f"worker {rank} failed: {reason}"
