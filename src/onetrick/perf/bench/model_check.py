"""The cost model against a bench result: predict every measured row, report the errors.

For each bench row the prediction uses the run's measured link
(:meth:`~onetrick.perf.predict.step.Link.from_measured`), per-layer costs timed here
(:class:`~onetrick.perf.measure.block_times.MeasuredCosts`, or none at all with ``bytes_only``), and,
as the only input taken from the bench's timings, the compute slowdown of K workers
sharing the machine: the ``independent`` row's step over the ``single`` step.
"""
from __future__ import annotations

import json
from pathlib import Path

from onetrick.perf.bench.report import bench_row
from onetrick.perf.measure.block_times import MeasuredCosts
from onetrick.perf.predict.blocks import model_blocks
from onetrick.perf.predict.compute import ZeroCosts
from onetrick.perf.predict.step import Link, Variant, images_per_step, predict

__all__ = ["validate"]


def _classes(data: str) -> int:
    from onetrick.data import SYNTHETIC_CLASSES

    kind, _, arg = data.partition(":")
    if kind == "synthetic":
        return int(arg) if arg else SYNTHETIC_CLASSES
    return 10 if kind == "digits" else 1000


def validate(bench_json: Path, reps: int = 5, bytes_only: bool = False) -> dict:
    """Predict every row of a bench result on this machine's measured costs and the
    bench's measured link; return rows with prediction errors. ``bytes_only``: compare
    the bytes alone (no layer is timed)."""
    bench = json.loads(Path(bench_json).read_text())
    blocks, model = model_blocks(bench["model"], _classes(bench["data"]), bench["image_size"], with_model=True)
    threads = bench.get("threads", 1)
    costs = ZeroCosts() if bytes_only else MeasuredCosts(blocks, threads=threads, reps=reps, model=model,
                                                                    overhead_rows=bench["batch"])
    link = Link.from_measured(bench.get("link", {}))
    cores = bench.get("machine", {}).get("cores")
    batch = bench["batch"]
    measured_base = next((r for r in bench["rows"] if r["strategy"] == "single"), None)

    def share(k: int, row: dict | None) -> tuple[float, str]:
        """How much slower K workers compute than one alone. Measured where the bench has
        an ``independent`` row at K (K processes that never communicate): its step time
        over the single step. Else time-sharing: K workers of T threads plus the other
        processes' measured load on C cores each get C / (K*T + other) of a core."""
        ind = bench_row(bench["rows"], "independent", k)
        if k > 1 and ind and measured_base:
            return max(1.0, ind["step_ms"] / measured_base["step_ms"]), "independent row"
        other = (row or {}).get("foreign_cores") or 0.0
        return (max(1.0, (k * threads + other) / cores) if cores else 1.0), "time-sharing"

    base = predict(blocks, costs, Variant("single"), 1, batch, slow=share(1, measured_base)[0])
    out = []
    for row in bench["rows"]:
        k = row["workers"]
        slow, why = share(k, row)
        strategy = "single" if row["strategy"] == "independent" else row["strategy"]
        variant = Variant(strategy, row.get("sync") or "ddp", row.get("scheme"), row.get("fc_batch") or "full")
        pred = predict(blocks, costs, variant, 1 if strategy == "single" else k, batch, link, slow)
        images = k * batch if row["strategy"] == "independent" else images_per_step(row["strategy"], k, batch)
        p_speed = images / pred.step_s / (batch / base.step_s) if not bytes_only else None
        m_speed = row.get("speedup")
        out.append({"label": row["label"], "workers": k, "foreign_cores": row.get("foreign_cores"), "share": slow,
                    "share_from": why,
                    "measured_step_ms": row["step_ms"],
                    "predicted_step_ms": pred.step_s * 1e3,
                    "step_error": None if bytes_only else pred.step_s * 1e3 / row["step_ms"] - 1,
                    "measured_speedup": m_speed, "predicted_speedup": p_speed,
                    "speedup_error": (p_speed / m_speed - 1) if m_speed and p_speed else None,
                    "measured_bytes": row.get("bytes", {}), "predicted_bytes": pred.bytes,
                    "measured_hidden": row.get("hidden"), "predicted_hidden": pred.hidden})
    return {"bench": str(bench_json), "bytes_only": bytes_only, "model": bench["model"],
            "image_size": bench["image_size"], "batch": batch,
            "link_gbps": link.gbps, "latency_us": link.latency_us, "collective_us": link.collective_us,
            "cores": cores, "threads": threads,
            "overhead_ms": costs.overhead(batch) * 1e3,
            "single_measured_ms": measured_base["step_ms"] if measured_base else None,
            "single_predicted_ms": base.step_s * 1e3, "rows": out}
