"""``onetrick bench --validate-plan``: every candidate the planner can pick, run for real,
against the planner's pick.

The bench runs ``single``, ``independent`` and every runnable candidate of
:func:`~onetrick.perf.planner.candidate_variants` (data/ddp, data/sharded, model at K*B
examples, hybrid a/b/c, FC batch K*B) at each K. Then, per K, the planner plans with
what it would have at start-up: layer costs timed here
(:func:`~onetrick.perf.planner.measured_costs`) and the link between K workers measured
here (:func:`~onetrick.perf.measure.shared_host.measured_link`: the idle link, each op's
bandwidth, the busy workers' cost per rendezvous and per MB overlapped); plus, from the
bench (:func:`~onetrick.perf.measure.shared_host.calibration`), the machine's speed during the bench against its speed now (the ``single`` row over its
prediction), by which compute and the probe's wall times are scaled, and what K workers
lose to each other per step (the ``independent`` row, K workers that never communicate,
less what time-sharing the cores explains), added to every candidate's step; so the pick
is the one the live planner makes from the same timings. Reported per K: the pick's
measured step against the best measured candidate's, and per row the
prediction's error, with and without the probe's busy-worker and per-op terms. The pick is
of the plans that fit in memory (the bench's steps, :mod:`~onetrick.perf.predict.memory`,
against ``--memory-per-worker`` or this machine's available memory / K): the bench left out
the jobs that do not, and the planner drops them.
"""
from __future__ import annotations

from onetrick.perf.bench.report import bench_row
from onetrick.perf.measure.shared_host import calibration, measured_link
from onetrick.perf.planner import make_plan, measured_costs, plan_memory
from onetrick.perf.predict.step import Link, Variant, predict

__all__ = ["PLAN_STRATEGIES", "plan_report", "validate_plan"]

#: what bench runs for --validate-plan
PLAN_STRATEGIES = {"strategies": ["single", "independent", "data", "model", "hybrid"], "sync": ["ddp", "sharded"],
                   "scheme": ["a", "b", "c"], "fc_batch": ["full"]}


def _classes(data: str) -> int:
    from onetrick.perf.bench.model_check import _classes as classes

    return classes(data)


def _calibration(rows: list[dict], k: int, threads: int, cores: int | None, single_ms: float
                 ) -> tuple[float, float, float]:
    """``(drift, share, contention_ms)`` for K workers from the bench's ``single`` and
    ``independent`` rows (:func:`~onetrick.perf.measure.shared_host.calibration`)."""
    single, ind = bench_row(rows, "single", 1), bench_row(rows, "independent", k)
    return calibration(single["step_ms"] if single else None, ind["step_ms"] if ind else None, k, threads, cores,
                       single_ms)


def validate_plan(result: dict) -> dict:
    """Per K: the planner's pick, the best measured candidate, the gap; per row: predicted
    and measured step ms."""
    batch, threads = result["batch"], result.get("threads", 1)
    classes = _classes(result["data"])
    blocks, costs = measured_costs(result["model"], classes, 3, result["image_size"], batch, threads)
    cores = result.get("machine", {}).get("cores")
    single_ms = predict(blocks, costs, Variant("single"), 1, batch).step_s * 1e3
    out = []
    for k in sorted({r["workers"] for r in result["rows"] if r["workers"] > 1}):
        measured = {r["label"]: r for r in result["rows"] if r["workers"] == k and r["strategy"] != "independent"}
        if not measured:
            continue
        drift, share, contention_ms = _calibration(result["rows"], k, threads, cores, single_ms)
        slow, extra = drift * share, contention_ms / 1e3
        probe = measured_link(k, threads)   # what train --strategy auto measures at start-up
        link = Link.from_measured(probe).slower(drift)
        bare = link.idle()
        memory, available, source = plan_memory(result["model"], classes, 3, result["image_size"], k,
                                                result.get("memory_per_worker"), result.get("device", "cpu"), run="bench",
                                                here=True)
        plan = make_plan(blocks, costs, k, batch, link, slow, runnable_only=True, memory=memory, available=available,
                         available_from=source, contention_s=extra)
        before = {c.label: c.result.step_s * 1e3
                  for c in make_plan(blocks, costs, k, batch, bare, slow, contention_s=extra).candidates}
        ran = [c for c in plan.candidates if c.label in measured]
        pick = min((c for c in ran if c.fits), key=lambda c: c.result.step_s)   # what it would pick of what ran
        best = min(measured.values(), key=lambda r: r["step_ms"])   # every candidate's step is K*B examples
        rows = [{"label": c.label, "predicted_step_ms": c.result.step_s * 1e3,
                 "measured_step_ms": measured[c.label]["step_ms"],
                 "error": c.result.step_s * 1e3 / measured[c.label]["step_ms"] - 1,
                 "error_uncalibrated": before[c.label] / measured[c.label]["step_ms"] - 1} for c in ran]
        out.append({"workers": k, "slow": slow, "drift": drift, "share": share, "contention_ms": contention_ms,
                    "link_gbps": link.gbps, "collective_us": link.collective_us,
                    "sync_us": link.sync_us, "overlap_us_per_mb": link.overlap_us_per_mb, "op_factor": link.op_factor,
                    "large_op_factor": link.large_op_factor,
                    "pick": pick.label, "pick_measured_ms": measured[pick.label]["step_ms"],
                    "best": best["label"], "best_measured_ms": best["step_ms"],
                    "gap": measured[pick.label]["step_ms"] / best["step_ms"] - 1, "reason": plan.reason,
                    "dropped": [c.label for c in plan.dropped], "rows": rows})
    every = [r for k in out for r in k["rows"]]
    return {"model": result["model"], "image_size": result["image_size"], "batch": batch, "threads": threads,
            "per_k": out, "within_15": sum(abs(r["error"]) <= 0.15 for r in every),
            "within_15_uncalibrated": sum(abs(r["error_uncalibrated"]) <= 0.15 for r in every), "rows": len(every)}


def plan_report(v: dict) -> str:
    """Markdown: the pick against the best measured at each K, then every row's error."""
    lines = [f"### Planner validation: {v['model']} {v['image_size']}px, B={v['batch']}, {v['threads']} thread(s) per "
             "worker", "", "Measured in the launcher at each K, as `train --strategy auto` does: "
             + "; ".join(f"K={k['workers']}: all-reduce {k['link_gbps'] or 0:.1f} Gbit/s + {k['collective_us']:.0f} us, "
                         + ", ".join(f"{op} {f:.2f}x its bandwidth" for op, f in k["op_factor"].items())
                         + "".join(f" ({f:.2f}x over 32 MiB)" for op, f in k.get("large_op_factor", {}).items()
                                   if op == "all_gather")
                         + f", {k['sync_us'] / 1e3:.1f} ms per rendezvous among busy workers, "
                         f"{k['overlap_us_per_mb']:.0f} us of compute per MB overlapped"
                         + (f" (the probe's times x{k['drift']:.2f}, to the machine's speed during the bench)"
                            if abs(k.get("drift", 1.0) - 1) > 0.005 else "")
                         + (f", {k['contention_ms']:.0f} ms a step lost to the other workers (independent row)"
                            if "contention_ms" in k else "") for k in v["per_k"]) + ".", "",
             "| K | planner's pick | its measured step ms | best measured | its step ms | pick vs best |",
             "|---:|---|---:|---|---:|---:|"]
    for k in v["per_k"]:
        lines.append(f"| {k['workers']} | {k['pick']} | {k['pick_measured_ms']:.1f} | {k['best']} | "
                     f"{k['best_measured_ms']:.1f} | {k['gap']:+.1%} |")
    lines += [""] + [f"K={k['workers']}: {k['reason']}" + ("" if k["reason"].endswith(".") else ".") for k in v["per_k"]]
    lines += ["", "| K | candidate | predicted step ms | measured step ms | error | error without the measured terms |",
              "|---:|---|---:|---:|---:|---:|"]
    for k in v["per_k"]:
        for r in k["rows"]:
            lines.append(f"| {k['workers']} | {r['label']} | {r['predicted_step_ms']:.1f} | {r['measured_step_ms']:.1f} | "
                         f"{r['error']:+.1%} | {r['error_uncalibrated']:+.1%} |")
    lines += ["", f"{v['within_15']} of {v['rows']} rows predicted within 15% of the measured step "
                  f"({v['within_15_uncalibrated']} without the measured terms)."]
    return "\n".join(lines)
