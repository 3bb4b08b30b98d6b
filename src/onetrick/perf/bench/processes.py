"""What runs inside bench's worker processes, and the probes of the machine itself.

:func:`bench_worker` times barrier-bracketed training steps of one strategy (and a plain
PyTorch loop beside the one-worker strategy); :func:`link_worker` measures the link
(latency, bandwidth, the fixed cost of a tiny collective). The probes: this CPU's matmul
FLOP/s, the GPU's name, the machine's description (the cores other processes keep busy
are :mod:`~onetrick.perf.measure.shared_host`'s).
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from onetrick.config import TrainConfig
from onetrick.perf.measure.shared_host import machine_busy_s

__all__ = ["bench_worker", "gpu_name", "link_worker", "machine_info", "matmul_gflops"]


def _batches(data, rank: int, world: int, batch: int, count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i in range(count):
        start = (i * world + rank) * batch
        items = [data.train[start + j] for j in range(batch)]
        out.append((torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])))
    return out


def bench_worker(rt, cfg: TrainConfig, job: dict) -> dict:
    """Runs on every worker: warm up, then time ``job['steps']`` barrier-bracketed steps;
    report them and this worker's peak memory from its start (:mod:`onetrick.perf.measure.memory`)."""
    import torch.distributed as dist

    from onetrick.data import build_data
    from onetrick.distributed import parallelize
    from onetrick.models import build_model
    from onetrick.perf.measure.memory import peak_bytes, reset_peak

    reset_peak(rt.device)
    data = build_data(cfg.data, cfg.image_size)
    torch.manual_seed(cfg.seed)
    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # as a plain GPU loop would run
    model = build_model(cfg.model, data.num_classes, data.in_channels, cfg.dropout)
    strategy = parallelize(model, cfg, rt)
    strategy.set_training(True)
    batches = [(x.to(rt.device), y.to(rt.device))
               for x, y in _batches(data, strategy.data_rank, strategy.data_world, cfg.batch)]

    plain = None
    if job.get("baseline"):
        torch.manual_seed(cfg.seed)
        pmodel = build_model(cfg.model, data.num_classes, data.in_channels, cfg.dropout).to(rt.device).train()
        popt = torch.optim.SGD(pmodel.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

        def plain(x, y):   # the plain loop at the same precision: autocast as the PyTorch docs write it
            popt.zero_grad(set_to_none=True)
            with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss = F.cross_entropy(pmodel(x).float(), y)
            loss.backward()
            popt.step()

    def barrier():
        if rt.world > 1:
            dist.barrier()
        elif rt.device.type == "cuda":   # a step's end is when the GPU finishes it
            torch.cuda.synchronize()

    link = {}
    if job.get("link_probe") and rt.world > 1:   # ranks 0 and 1 measure the link first
        link = link_worker(rt, cfg, *job["link_probe"])
        barrier()

    for i in range(job["warmup"]):
        if plain:
            plain(*batches[i % 2])
        strategy.train_step(*batches[i % 2])
    barrier()
    strategy.comm.take()
    step_s, local_s, plain_s, waits, sent, calls = [], [], [], [], [], []
    busy0, cpu0, wall0 = machine_busy_s(), time.process_time(), time.perf_counter()
    for i in range(job["steps"]):
        x, y = batches[i % 2]
        if plain:
            barrier()
            t0 = time.perf_counter()
            plain(x, y)
            barrier()
            plain_s.append(time.perf_counter() - t0)
        barrier()
        t0 = time.perf_counter()
        strategy.train_step(x, y)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        snap = strategy.comm.take()
        barrier()
        step_s.append(time.perf_counter() - t0)
        local_s.append(t1 - t0)
        waits.append(snap["comm_wait_s"])
        sent.append(snap["bytes"])
        calls.append(snap["calls"])
    busy1, cpu1, wall1 = machine_busy_s(), time.process_time(), time.perf_counter()
    tags = sorted({t for s in sent for t in s})
    return {"rank": rt.rank, "step_s": step_s, "local_s": local_s, "plain_s": plain_s, "peak_memory_bytes": peak_bytes(rt.device),
            "window_s": wall1 - wall0, "cpu_s": cpu1 - cpu0, "machine_busy_s": busy1 - busy0,
            "comm_wait_s": statistics.mean(waits) if waits else 0.0,
            "bytes": {t: statistics.mean(s.get(t, 0) for s in sent) for t in tags},
            "calls_total": [sum(c.values()) for c in calls],
            "calls": {op: statistics.mean(c.get(op, 0) for c in calls) for op in sorted({o for c in calls for o in c})},
            "threads": torch.get_num_threads(), "link": link}


def link_worker(rt, cfg: TrainConfig, nbytes: int, reps: int) -> dict:
    """Ranks 0 and 1: latency (tiny ping-pong) and bandwidth (send ``nbytes``, tiny ack);
    then every rank: the time of a tiny collective (all-reduce / all-gather of one float),
    the fixed cost each synchronous collective pays whatever its size."""
    import torch.distributed as dist

    if rt.world < 2:
        return {}
    out: dict = {}
    if rt.rank <= 1:
        big = torch.ones(max(1, nbytes // 4))
        tiny = torch.zeros(1)
        peer = 1 - rt.rank
        lat, bw = [], []
        for _ in range(21):
            if rt.rank == 0:
                t0 = time.perf_counter()
                dist.send(tiny, peer)
                dist.recv(tiny, peer)
                lat.append((time.perf_counter() - t0) / 2)
            else:
                dist.recv(tiny, peer)
                dist.send(tiny, peer)
        one_way = statistics.median(lat[1:]) if lat else 0.0
        for _ in range(reps + 1):
            if rt.rank == 0:
                t0 = time.perf_counter()
                dist.send(big, peer)
                dist.recv(tiny, peer)
                bw.append(big.numel() * 4 / max(1e-9, time.perf_counter() - t0 - 2 * one_way))
            else:
                dist.recv(big, peer)
                dist.send(tiny, peer)
        if rt.rank == 0:
            out = {"measured_mbps": statistics.median(bw[1:]) * 8 / 1e6, "latency_us": one_way * 1e6,
                   "probe_bytes": big.numel() * 4, "samples_mbps": [b * 8 / 1e6 for b in bw[1:]]}
    dist.barrier()
    one = torch.zeros(1)
    gathered = torch.zeros(rt.world)
    coll = {"all_reduce": [], "all_gather": []}
    for _ in range(21):
        t0 = time.perf_counter()
        dist.all_reduce(one)
        t1 = time.perf_counter()
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(gathered, one)
        t2 = time.perf_counter()
        coll["all_reduce"].append(t1 - t0)
        coll["all_gather"].append(t2 - t1)
    if rt.rank == 0:
        out["collective_us"] = {op: statistics.median(v[1:]) * 1e6 for op, v in coll.items()}
    return out


def matmul_gflops(threads: int = 1, n: int = 2048, reps: int = 5) -> float:
    """fp32 matrix multiply FLOP/s of one worker (``threads`` threads), median of ``reps``."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return 2 * n**3 / statistics.median(times) / 1e9
    finally:
        torch.set_num_threads(old)


def gpu_name(device: str) -> str | None:
    """The GPU's name for a CUDA bench (None on the CPU)."""
    return torch.cuda.get_device_name(0) if device == "cuda" else None


def machine_info() -> dict:
    """CPU model, cores, torch, Python and kernel versions of this machine."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "kernel": platform.release()}
