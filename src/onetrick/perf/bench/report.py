"""Writing what bench and simulate found: Markdown tables, JSON, plots (PNG).

Nothing here measures or predicts; every function takes the result dicts of
:func:`~onetrick.perf.bench.runner.run_bench`, :func:`~onetrick.perf.predict.step.sweep` and
:func:`~onetrick.perf.bench.model_check.validate` as they are also written to JSON, so a report
can be rendered again from a committed JSON file.
"""
from __future__ import annotations

import json
from pathlib import Path

from onetrick.perf.predict.blocks import activation_bytes
from onetrick.perf.predict.schedule import ACT_TAG, HEAD_TAG

__all__ = ["COLUMNS", "PAPER_SPEEDUPS", "bench_report", "bench_row", "bench_table", "bytes_table", "fmt", "paper_table",
           "plot_bench", "plot_sweep", "simulation_report", "sweep_table", "validation_table", "write_bench",
           "write_simulation"]

COLUMNS = ["strategy", "K", "(conv, FC) batch", "step ms", "images/s", "speedup", "efficiency", "of ceiling", "weights MB",
           "activations MB", "other MB", "collectives/step", "comm est ms", "exposed ms", "hidden", "other procs (cores)",
           "peak memory per worker GB", "predicted GB"]

#: the paper's measured speedups (docs/PAPER.md) for K GPUs, hybrid scheme (b)
PAPER_SPEEDUPS = {"full": {1: 1.0, 2: 1.95, 4: 3.74, 8: 6.25}, "worker": {1: 1.0, 2: 1.93, 4: 3.66, 8: 6.16}}


def fmt(x: float | None, spec: str = ".2f", none: str = "-") -> str:
    """``x`` formatted, or ``none`` for None (a cell with nothing to show)."""
    return none if x is None else format(x, spec)


def bench_row(rows: list[dict], strategy: str, k: int) -> dict | None:
    """The bench row of ``strategy`` at ``k`` workers (``single``, ``independent``), or None."""
    return next((r for r in rows if r["strategy"] == strategy and r["workers"] == k), None)


def bench_table(result: dict) -> str:
    """The bench table: one line per configuration (and the plain PyTorch loop under ``single``)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---:|---|" + "---:|" * (len(COLUMNS) - 3)]
    for r in result["rows"]:
        lines.append(
            f"| {r['label']} | {r['workers']} | {r['batches']} | {r['step_ms']:.1f} | {r['images_per_s']:.1f} | "
            f"{fmt(r['speedup'], '.2f')}x | {fmt(r['efficiency'], '.0%')} | {fmt(r.get('of_ceiling'), '.0%')} | "
            f"{r['bytes_weights'] / 1e6:.3f} | "
            f"{r['bytes_activations'] / 1e6:.3f} | {r['bytes_other'] / 1e6:.3f} | {fmt(r.get('collectives_per_step'), 'g')} | "
            f"{fmt(r['comm_est_ms'], '.1f')} | "
            f"{fmt(r['exposed_ms'], '.1f')} | {fmt(r['hidden'], '.0%')} | {fmt(r['foreign_cores'], '.2f')} | "
            f"{_gb(r.get('peak_memory_bytes'))} | {_predicted_gb(r)} |")
        b = r.get("baseline") or (result.get("baseline") if r["strategy"] == "single" and r["workers"] == 1 else None)
        if b:
            lines.append(f"| torch loop (plain PyTorch){'/bf16' if r.get('precision') == 'bf16' else ''} | 1 | {r['batches']} | {b['torch_loop_step_ms']:.1f} | "
                         f"{b['torch_loop_images_per_s']:.1f} |" + " - |" * (len(COLUMNS) - 5))
    for s in result.get("skipped") or []:   # left out before launch: they cannot fit here
        lines.append(f"| {s['label']} | {s['workers']} | not run: {s['reason']} |" + " - |" * (len(COLUMNS) - 3))
    return "\n".join(lines)


def _gb(nbytes: float | None) -> str:
    return "-" if not nbytes else f"{nbytes / 1e9:.2f}"


def _predicted_gb(row: dict) -> str:
    """The predicted peak per worker, and its error against the measured one."""
    pred, err = row.get("predicted_memory_bytes"), row.get("memory_error")
    return _gb(pred) + (f" ({err:+.0%})" if err is not None else "")


def bench_report(result: dict) -> str:
    """The bench's Markdown report: machine, link, method, the table, the framework tax."""
    m, link = result["machine"], result["link"]
    out = [(f"## onetrick bench: {result['model']} at {result['image_size']}x{result['image_size']}, "
           f"B={result['batch']} per worker, {result['threads']} thread(s) per worker"), ""]
    if result.get("command"):
        out += [f"Command: `{result['command']}`", ""]
    if result.get("gpu"):
        out += [f"Device: {result['gpu']} (CUDA; every step ends with a device synchronisation).", ""]
    out += [(f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; load average before/after "
            f"{result['load_before'][0]:.2f}/{result['load_after'][0]:.2f}; matmul {result['cpu_gflops_per_worker']:.1f} "
            f"GFLOP/s per worker."), ""]
    lk = f"Link: {link['note']}"
    if link.get("measured_mbps"):
        lk += (f"; measured {link['measured_mbps']:.0f} Mbit/s point to point "
               f"({link['measured_mbps'] / 8:.0f} MB/s), one-way latency {link['latency_us']:.0f} us")
    rounds = result.get("rounds", 1)
    out += [lk + ".", "", f"{result['warmup']} warm-up steps, median of {result['steps']} measured steps"
            + (f"; each configuration run {rounds} times, interleaved; reported: the fastest of the rounds in which "
               "other processes used least CPU (within 0.1 core)" if rounds > 1 else "") + ". `other procs`: cores used by other processes "
            "while the steps were measured (the machine is shared). `peak memory per worker`: the largest of the "
            "workers' peaks (on the CPU private memory: the RSS high-water mark less the shared libraries' file pages; "
            "`torch.cuda.max_memory_allocated` on CUDA); `predicted`: "
            "the memory model's peak per worker (`onetrick.perf.predict.memory`) and its error against the measured one.",
            "", bench_table(result)]
    taxes = [r for r in result["rows"] if r.get("baseline")] or ([{"baseline": result["baseline"]}]
                                                                  if result.get("baseline") else [])
    for r in taxes:
        b, bf16 = r["baseline"], " (bf16)" if r.get("precision") == "bf16" else ""
        out += ["", (f"Framework tax (one worker){bf16}: onetrick `single` {b['onetrick_step_ms']:.1f} ms/step vs plain "
                    f"PyTorch loop {b['torch_loop_step_ms']:.1f} ms/step: {b['tax']:+.1%}.")]
    return "\n".join(out)


def plot_bench(result: dict, path: Path) -> Path:
    """Measured speedup against K, and bytes per step by kind (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [lab for lab in dict.fromkeys(r["label"] for r in rows) if lab != "single"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    ks = sorted({r["workers"] for r in rows})
    ax1.plot(ks, ks, "k:", label="ideal")
    single = [r for r in rows if r["strategy"] == "single"]
    for i, lab in enumerate(labels):
        pts = sorted((r["workers"], r["speedup"]) for r in single + [r for r in rows if r["label"] == lab]
                     if r["speedup"] is not None)
        style = {"color": "0.5", "ls": "--", "marker": "s"} if lab.startswith("independent") else {"color": f"C{i}", "marker": "o"}
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], label=lab, **style)
    ax1.set_xticks(ks)
    ax1.set_xlabel("workers K")
    ax1.set_ylabel("speedup over one worker (images/s)")
    ax1.set_title("measured speedup")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    multi = [r for r in rows if r["workers"] > 1 and r["strategy"] != "independent"]
    names = [f"{r['label']}\nK={r['workers']}" for r in multi]
    x = range(len(multi))
    w_mb = [r["bytes_weights"] / 1e6 for r in multi]
    a_mb = [r["bytes_activations"] / 1e6 for r in multi]
    o_mb = [r["bytes_other"] / 1e6 for r in multi]
    ax2.bar(x, w_mb, label="weights", color="C0")
    ax2.bar(x, a_mb, bottom=w_mb, label="activations", color="C1")
    ax2.bar(x, o_mb, bottom=[a + b for a, b in zip(w_mb, a_mb)], label="labels+metrics", color="C2")
    for xi, r in zip(x, multi):
        ax2.annotate(f"{r['bytes_total'] / 1e6:.2f} MB", (xi, r["bytes_total"] / 1e6), ha="center", va="bottom", fontsize=7)
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(names, fontsize=7)
    ax2.set_ylabel("MB sent per worker per step")
    ax2.set_title("bytes per step")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, axis="y")
    link = result["link"]
    fig.suptitle(f"{result['model']} {result['image_size']}px, B={result['batch']}/worker; link: "
                 f"{(str(round(link['measured_mbps'])) + ' Mbit/s measured') if link.get('measured_mbps') else 'none'}"
                 f"{' (shaped ' + format(link['shaped_mbps'], 'g') + ' Mbit/s)' if link.get('shaped_mbps') else ' (loopback)'}",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_bench(result: dict, out: Path) -> list[Path]:
    """OUT.md, OUT.json and (with a multi-worker row) OUT.png."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md, js, png = out.with_suffix(".md"), out.with_suffix(".json"), out.with_suffix(".png")
    md.write_text(bench_report(result) + "\n")
    js.write_text(json.dumps(result, indent=1))
    written = [md, js]
    if any(r["workers"] > 1 for r in result["rows"]):
        written.append(plot_bench(result, png))
    return written


def sweep_table(rows: list[dict]) -> str:
    """The simulator's sweep: one line per predicted (variant, K)."""
    lines = ["| strategy | K | step ms | images/s | speedup | efficiency | MB/step weights | MB/step activations | comm ms | exposed ms | hidden |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['workers']} | {r['step_s'] * 1e3:.1f} | {r['images_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['efficiency']:.0%} | {r['bytes'].get('weights', 0) / 1e6:.2f} | "
                     f"{activation_bytes(r['bytes']) / 1e6:.2f} | {r['comm_s'] * 1e3:.1f} | {r['exposed_s'] * 1e3:.1f} | "
                     f"{fmt(r['hidden'], '.0%')} |")
    return "\n".join(lines)


def validation_table(v: dict) -> str:
    """Predicted against measured, per bench row (bytes only: per tag, equal or not)."""
    if v.get("bytes_only"):
        lines = [(f"Bytes per worker per step, predicted vs measured by `{v['bench']}` ({v['model']} at "
                 f"{v['image_size']}px, B={v['batch']}):"), "",
                 "| strategy | K | tag | measured bytes | predicted bytes | equal |", "|---|---:|---|---:|---:|---|"]
        for r in v["rows"]:
            mb, pb = r["measured_bytes"], r["predicted_bytes"]
            for t in sorted(set(mb) | set(pb)):
                m, p = int(mb.get(t, 0)), int(pb.get(t, 0))
                lines.append(f"| {r['label']} | {r['workers']} | {t} | {m:,} | {p:,} | {'yes' if m == p else 'NO'} |")
        return "\n".join(lines)
    bw = f"{v['link_gbps'] * 1e3:.0f} Mbit/s" if v["link_gbps"] else "unlimited"
    lines = [(f"Validation against `{v['bench']}` ({v['model']} at {v['image_size']}px, B={v['batch']}, link {bw}, "
             f"{v['collective_us']:.0f} us per collective, {v['cores']} cores; per-step overhead measured "
             f"{v['overhead_ms']:.1f} ms):"), "",
             "| strategy | K | other procs (cores) | compute slowdown x | measured step ms | predicted step ms | error | measured speedup | predicted speedup | error | bytes match |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in v["rows"]:
        mb, pb = r["measured_bytes"], r["predicted_bytes"]
        same = all(int(mb.get(t, 0)) == int(pb.get(t, 0)) for t in set(mb) | set(pb))
        if r["share_from"] == "independent row" and r["label"].startswith("independent"):
            lines.append(f"| {r['label']} | {r['workers']} | {fmt(r['foreign_cores'])} | {r['share']:.2f} | "
                         f"{r['measured_step_ms']:.1f} | (input) | - | {fmt(r['measured_speedup'])}x | (input) | - | - |")
            continue
        lines.append(f"| {r['label']} | {r['workers']} | {fmt(r['foreign_cores'])} | {r['share']:.2f} | "
                     f"{r['measured_step_ms']:.1f} | {r['predicted_step_ms']:.1f} | "
                     f"{r['step_error']:+.0%} | {fmt(r['measured_speedup'])}x | {r['predicted_speedup']:.2f}x | "
                     f"{fmt(r['speedup_error'], '+.0%')} | {'yes' if same else 'no'} |")
    return "\n".join(lines)


def bytes_table(rows: list[dict], max_k: int = 8) -> str:
    """Bytes per worker per step by kind, and the ratio to data parallelism (DDP) at the same K."""
    lines = [("| strategy | K | weights MB | last-conv activations MB | FC-head exchanges MB | labels+metrics MB | "
             "total MB | vs data/ddp |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ddp = {r["workers"]: r["bytes_total"] for r in rows if r["label"] == "data/ddp"}
    for r in rows:
        if r["workers"] < 2 or r["workers"] > max_k:
            continue
        b = r["bytes"]
        other = sum(v for t, v in b.items() if t not in ("weights", ACT_TAG, HEAD_TAG))
        ratio = r["bytes_total"] / ddp[r["workers"]] if ddp.get(r["workers"]) else None
        lines.append(f"| {r['label']} | {r['workers']} | {b.get('weights', 0) / 1e6:.2f} | {b.get(ACT_TAG, 0) / 1e6:.2f} | "
                     f"{b.get(HEAD_TAG, 0) / 1e6:.2f} | {other / 1e6:.4f} | {r['bytes_total'] / 1e6:.2f} | "
                     f"{fmt(ratio, '.3f')} |")
    return "\n".join(lines)


def paper_table(rows: list[dict]) -> str:
    """Predicted speedups against the paper's measured ones at 1, 2, 4, 8 GPUs."""
    lines = ["| GPUs | paper (K*B, K*B) | predicted hybrid/b | paper (K*B, B) | predicted hybrid/b/fc-B | predicted data/ddp |",
             "|---:|---:|---:|---:|---:|---:|"]
    by = {(r["label"], r["workers"]): r for r in rows}
    for k in (1, 2, 4, 8):
        if k == 1:
            s = by.get(("single", 1))
            pb = pw = pd = s["speedup"] if s else None
        else:
            pb = by.get(("hybrid/b", k), {}).get("speedup")
            pw = by.get(("hybrid/b/fc-B", k), {}).get("speedup")
            pd = by.get(("data/ddp", k), {}).get("speedup")
        lines.append(f"| {k} | {PAPER_SPEEDUPS['full'][k]:.2f}x | {fmt(pb)}x | {PAPER_SPEEDUPS['worker'][k]:.2f}x | "
                     f"{fmt(pw)}x | {fmt(pd)}x |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict], path: Path, title: str, validation: list[dict] | None = None,
               paper: bool = False) -> list[Path]:
    """Predicted speedup and bytes per step against K (log-log); measured bench points as
    crosses, the paper's measured speedups as black markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = []
    for r in rows:
        if r["label"] not in labels and r["label"] != "single":
            labels.append(r["label"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    ks = sorted({r["workers"] for r in rows})
    ax1.plot(ks, ks, "k:", label="ideal")
    for i, label in enumerate(labels):
        pts = sorted((r["workers"], r["speedup"]) for r in rows if r["label"] == label or (r["label"] == "single"))
        color = f"C{i}"
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=3, color=color, label=label)
        mb = sorted((r["workers"], r["bytes_total"] / 1e6) for r in rows if r["label"] == label)
        ax2.plot([p[0] for p in mb], [p[1] for p in mb], "-o", ms=3, color=color, label=label)
        if validation:
            meas = [(v["workers"], v["measured_speedup"]) for v in validation if v["label"] == label and v["measured_speedup"]]
            if meas:
                ax1.plot([m[0] for m in meas], [m[1] for m in meas], "x", ms=9, mew=2, color=color)
    if validation:
        ax1.plot([], [], "kx", ms=9, mew=2, label="measured (bench)")
    if paper:
        for fcb, marker in (("full", "*"), ("worker", "P")):
            pts = sorted(PAPER_SPEEDUPS[fcb].items())
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker, color="k", ms=9, ls="none",
                     label=f"paper, measured ({'K*B, K*B' if fcb == 'full' else 'K*B, B'})")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("workers K")
        ax.grid(alpha=0.3)
    ax1.set_yscale("log", base=2)
    ax1.set_ylabel("speedup over one worker (images/s)")
    ax1.set_title("predicted speedup")
    ax1.legend(fontsize=7)
    ax2.set_yscale("log")
    ax2.set_ylabel("MB sent per worker per step")
    ax2.set_title("bytes per step (all tags)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def simulation_report(title: str, rows: list[dict], validations: list[dict], paper: bool) -> str:
    """The simulator's Markdown report: the sweep, bytes by kind (K <= 8), with
    ``paper`` the paper's speedups, then one table per validation."""
    text = [f"## Simulated: {title}", "", sweep_table(rows), "", "Bytes per worker per step by kind (K <= 8):", "",
            bytes_table(rows)]
    if paper:
        text += ["", "Against the paper's measured speedups (docs/PAPER.md):", "", paper_table(rows)]
    for v in validations:
        text += ["", validation_table(v)]
    return "\n".join(text)


def write_simulation(out: Path, report: str, meta: dict, rows: list[dict], validations: list[dict], title: str,
                     paper_plot: bool) -> list[Path]:
    """OUT.md (``report``), OUT.json (``meta``, the rows and validations) and OUT.png;
    validated bench rows of the same model, image size and batch are plotted as crosses."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(f"{report}\n")
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows, "validation": validations}, indent=1,
                                                   default=str))
    same_model = [r for v in validations if v["model"] == meta["model"] and v["batch"] == meta["batch"]
                  and v["image_size"] == meta["image_size"] and not v.get("bytes_only") for r in v["rows"]]
    plot_sweep(rows, out.with_suffix(".png"), title, same_model or None, paper=paper_plot)
    return [out.with_suffix(".md"), out.with_suffix(".json"), out.with_suffix(".png")]
