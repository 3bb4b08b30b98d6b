"""Memory per worker, measured: :func:`reset_peak`, :func:`peak_bytes`, :func:`gather_peaks`;
and what a worker has: :func:`available_memory`. The prediction is
:mod:`onetrick.perf.predict.memory`.

Measured peak, per worker process:

* CPU: the process's private memory at its peak: the resident-set high-water mark
  (``VmHWM``) less the file-backed pages resident at the end (``RssFile``: the shared
  libraries' code and data, which the page cache shares between all workers and may drop;
  how much of them a process faults in varies between machines and page-cache states,
  by 250 MiB of this CUDA build of torch between two machines here, so counting them made
  the figure a property of the machine's cache rather than of the run).
  ``getrusage(RUSAGE_SELF).ru_maxrss``
  is not used as it stands: Linux carries the *parent's* high-water mark into a child
  across ``exec`` (``signal->maxrss``), so a worker spawned by a launcher that once held
  1 GiB reports 1 GiB (measured here: a spawned child that allocated nothing read
  1,074,752 KiB). :func:`peak_bytes` reads ``VmHWM`` of ``/proc/self/status``, the high-
  water mark of this process's own address space, which :func:`reset_peak` restarts at
  the current RSS (``/proc/self/clear_refs``, Linux >= 4.0) when a worker starts (a
  one-worker run runs in the launcher's own process). Without ``/proc`` it falls back to
  ``ru_maxrss``.
* CUDA: ``torch.cuda.max_memory_allocated()`` (reset by :func:`reset_peak`): tensors only,
  without the CUDA context and the caching allocator's reserve.
"""
from __future__ import annotations

import resource
import sys

import torch

__all__ = ["available_memory", "gather_peaks", "gb", "peak_bytes", "reset_peak", "rss_bytes"]


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes() -> int | None:
    """This process's resident set now (``VmRSS``), or None without ``/proc``."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak(device: torch.device | str = "cpu") -> None:
    """Restart the peak this process will report at what it holds now."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")   # resets VmHWM (and this mm's hiwater_rss) to the current RSS
    except OSError:
        pass


def peak_bytes(device: torch.device | str = "cpu") -> int:
    """This process's peak memory since :func:`reset_peak` (module docstring)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
        return int(kib) * 1024
    return (kib - (_status_kib("RssFile") or 0)) * 1024


def gather_peaks(device: torch.device | str = "cpu") -> list[int]:
    """Every worker's :func:`peak_bytes`, in rank order, on every worker (a collective
    when a process group is up; this process's alone otherwise). Bypasses the
    strategies' byte counters: it is no step's traffic."""
    import torch.distributed as dist

    device = torch.device(device)
    mine = peak_bytes(device)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    t = torch.tensor([mine], dtype=torch.int64, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [int(x.item()) for x in out]


def available_memory(device: str = "cpu", local_workers: int = 1, in_process: bool = False,
                     given_gb: float | None = None, here: bool = False) -> tuple[int | None, str]:
    """Memory one worker may use, and where the figure comes from: ``given_gb``
    (``--memory-per-worker``) when set; else on CUDA the device's total memory; on the CPU
    the machine's available memory (``MemAvailable`` of ``/proc/meminfo``) shared among the
    ``local_workers`` of this machine. ``in_process``: the one worker runs in this process
    (a one-worker run), so what it holds now counts too. ``here``: the workers are about to
    run on this machine's CPU (train, bench), so a ``given_gb`` over their share of its
    memory is capped at that share: K local workers cannot hold more than the machine has."""
    if given_gb is not None:
        given = int(given_gb * 1e9)
        share, how = _cpu_share(local_workers, in_process) if here and device == "cpu" else (None, "")
        if share is not None and share < given:
            return share, f"{how}, under --memory-per-worker {given_gb:g} GB"
        return given, "--memory-per-worker"
    if device == "cuda":
        if not torch.cuda.is_available():
            return None, "no CUDA device"
        return int(torch.cuda.get_device_properties(0).total_memory), "the GPU's total memory"
    return _cpu_share(local_workers, in_process)


def _cpu_share(local_workers: int, in_process: bool) -> tuple[int | None, str]:
    """This machine's available memory over its ``local_workers``, and how it was found."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        avail = None
    if avail is None:
        return None, "unknown"
    if in_process and local_workers == 1:
        avail += rss_bytes() or 0
    share = avail // max(1, local_workers)
    return share, ("available on this machine" if local_workers == 1 else
                   f"this machine's {avail / 1e9:.1f} GB available / {local_workers} workers")


def gb(nbytes: float) -> str:
    """Bytes as GB, as every line that names a memory figure prints them."""
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e9:.2f} GB"
