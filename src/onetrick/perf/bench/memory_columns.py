"""The bench's memory columns: each job's predicted peak per worker
(:mod:`onetrick.perf.predict.memory`), the jobs that cannot fit on this machine left out
before launch, and each row's measured peak (:mod:`onetrick.perf.measure.memory`, recorded by
:func:`~onetrick.perf.bench.processes.bench_worker`) beside the prediction."""
from __future__ import annotations

from onetrick.config import ConfigError, TrainConfig
from onetrick.data import build_data
from onetrick.perf.measure.memory import available_memory, gb
from onetrick.perf.predict.memory import MemoryPrediction, predict_for_config

__all__ = ["fitting_jobs", "memory_columns", "predicted_memory"]


def predicted_memory(cfg: TrainConfig, baseline: bool = False) -> MemoryPrediction | None:
    """The memory model's figure for one bench job (None where it cannot describe the model)."""
    try:
        data = build_data(cfg.data, cfg.image_size)
        return predict_for_config(cfg, data.num_classes, data.in_channels, cfg.image_size, run="bench",
                                  baseline=baseline)
    except (ValueError, RuntimeError, NotImplementedError):
        return None


def fitting_jobs(jobs: list, cfgs: list[TrainConfig], log, memory_per_worker: float | None = None
                 ) -> tuple[list, list, list, list[dict]]:
    """The jobs whose predicted peak per worker fits in what a worker has: ``memory_per_worker``
    GB, else detected here (:func:`~onetrick.perf.measure.memory.available_memory`); each other one
    is left out, said in one line and listed in the result's ``skipped``. Returns the jobs,
    their configs and predictions, and the skipped."""
    keep, skipped = ([], [], []), []
    for job, cfg in zip(jobs, cfgs):
        pred, k = predicted_memory(cfg, job.baseline), job.workers
        avail, how = available_memory(cfg.device, k, k == 1, memory_per_worker, here=True)
        if pred is not None and avail is not None and pred.total > avail:
            why = f"needs {gb(pred.total)} per worker, {gb(avail)} available ({how})"
            log(f"{job.label:>16} K={k}: not run: {why}")
            skipped.append({"label": job.label, "workers": k, "reason": why, "predicted_memory": pred.as_dict()})
            continue
        for lst, item in zip(keep, (job, cfg, pred)):
            lst.append(item)
    if not keep[0]:
        raise ConfigError("no bench job fits in this machine's memory: " + "; ".join(
            f"{s['label']} K={s['workers']} {s['reason']}" for s in skipped))
    return (*keep, skipped)


def memory_columns(res: dict[int, dict], pred: MemoryPrediction | None) -> dict:
    """A bench row's memory columns: every worker's measured peak, the largest, the
    memory model's figure and its error against the measured one."""
    peaks = [res[r].get("peak_memory_bytes") for r in sorted(res)]
    peak = max((p for p in peaks if p is not None), default=None)
    return {"peak_memory_bytes_per_worker": peaks, "peak_memory_bytes": peak,
            "predicted_memory": pred.as_dict() if pred is not None else None,
            "predicted_memory_bytes": pred.total if pred is not None else None,
            "memory_error": pred.total / peak - 1 if pred is not None and peak else None}
