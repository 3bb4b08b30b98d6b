"""``onetrick study``: the paper's results table in shape, on a real data set.

One worker against K workers of data parallelism and of the hybrid with the paper's two
batch sizes, (K*B, K*B) and (K*B, B), all for the same number of epochs; every row is a
real ``onetrick train`` run (its own run directory under ``OUT/runs/``), and the table
holds each row's final test error, wall time and bytes per step. docs/PAPER.md's table:

    GPUs  (conv, FC) batch   top-1 error   speedup
    1     (128, 128)         42.33%        1.00x
    2     (256, 256)         42.63%        1.95x
    2     (256, 128)         42.27%        1.93x
    ...

A run directory that already holds a finished run of the same configuration is reused,
and an interrupted one of the same configuration resumes from its newest checkpoint, so a
study stopped anywhere continues where it stopped (rerun the same command).
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from onetrick.config import TrainConfig
from onetrick.recipe import lr_scale_factor
from onetrick.run.plots import new_figure, read_metrics

VARIANTS = ("data", "hybrid-full", "hybrid-worker")
DATA_NAMES = {"digits": "digits (scikit-learn's bundled 8x8 digits, 1,437 train / 360 test)",
              "fashion-mnist": "Fashion-MNIST (60,000 train / 10,000 test, 28x28 grey, 10 classes)"}


@dataclass(frozen=True)
class Row:
    """One configuration of the study: K workers, a strategy, the FC batch, a seed."""

    workers: int
    variant: str  # "single", or one of VARIANTS
    seed: int
    scheme: str = "b"  # the hybrid's

    @property
    def name(self) -> str:
        return f"k{self.workers}-{self.variant}-seed{self.seed}"

    def config(self, base: TrainConfig, out: Path) -> TrainConfig:
        strategy, _, fc_batch = self.variant.partition("-")
        # --eval-every counts one worker's steps: K workers take K times fewer, so every
        # row is tested at the same epochs and the curves line up. A checkpoint at each
        # test: an interrupted row resumes from there.
        every = max(1, round(base.eval_every / self.workers))
        changes = {"workers": self.workers, "strategy": strategy, "seed": self.seed, "out": out / "runs" / self.name,
                   "progress": False, "eval_every": every, "log_every": every, "ckpt_every": every}
        if strategy == "hybrid":
            changes.update(scheme=self.scheme, fc_batch=fc_batch)
        return base.replace(**changes)

    def batches(self, b: int) -> str:
        """The paper's (conv batch, FC batch)."""
        k = self.workers
        return f"({k * b}, {b if self.variant == 'hybrid-worker' else k * b})"


def study_rows(workers: list[int], variants: list[str], seeds: list[int], scheme: str = "b") -> list[Row]:
    rows = []
    for seed in seeds:
        rows.append(Row(1, "single", seed))
        rows += [Row(k, v, seed, scheme) for k in workers if k > 1 for v in variants]
    return rows


#: options that say how a run is carried out, not what it computes: ignored when reusing a row
BOOKKEEPING = {"overwrite", "resume", "progress", "debug", "ckpt_every"}


ROW_FILE = "study-row.json"  # the row's configuration, written before it trains: what a rerun may resume


def _wanted(cfg: TrainConfig) -> dict:
    return {k: v for k, v in json.loads(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                     for k, v in vars(cfg).items()})).items() if k not in BOOKKEEPING}


def _matches(config: dict, cfg: TrainConfig) -> bool:
    return all(config.get(k) == v for k, v in _wanted(cfg).items())


def run_row(row: Row, base: TrainConfig, out: Path) -> dict:
    """Train one row (or reuse its finished run, or resume its interrupted one from its
    newest checkpoint); return its summary."""
    from onetrick.run import checkpoint
    from onetrick.run.train import train_validated

    cfg = row.config(base, out)  # validated by run_study before the first row
    run_dir = Path(cfg.out)
    summary_path, row_path = run_dir / "summary.json", run_dir / ROW_FILE
    if summary_path.is_file():
        done = json.loads(summary_path.read_text())
        if _matches(done["config"], cfg):
            print(f"{row.name}: reusing the finished run in {cfg.out}", flush=True)
            return done
    what = (f"{cfg.workers} worker(s), {cfg.strategy}"
            + (f", scheme {cfg.scheme}, fc-batch {cfg.fc_batch}" if cfg.strategy == "hybrid" else ""))
    if row_path.is_file() and _matches(json.loads(row_path.read_text()), cfg) and checkpoint.candidates(run_dir):
        print(f"{row.name}: resuming the interrupted run in {cfg.out} ({what})", flush=True)
        try:
            return train_validated(cfg.replace(resume=True))
        except checkpoint.CheckpointError as err:
            print(f"{row.name}: cannot resume ({err}); training it again", flush=True)
    print(f"{row.name}: training ({what})", flush=True)
    # The study owns its row directories: an unfinished or different run there is redone.
    run_dir.mkdir(parents=True, exist_ok=True)
    row_path.write_text(json.dumps(_wanted(cfg), indent=1))
    return train_validated(cfg.replace(overwrite=True))


def _lrs(row: Row, base: TrainConfig) -> tuple[float, float]:
    """(conv lr, FC lr) at the start of training: the conv rate follows --lr-scale; the
    FC rate too, except with an FC batch of B (the paper keeps it at one worker's)."""
    conv = base.lr * lr_scale_factor(base.lr_scale, row.workers)
    return conv, base.lr if row.variant == "hybrid-worker" else conv


def table_rows(rows: list[Row], summaries: dict[str, dict], base: TrainConfig) -> list[dict]:
    """One line per (K, variant): mean and spread over the seeds that have finished
    (``seeds`` of ``seeds_wanted``; a line with none finished has only its configuration)."""
    groups: dict[tuple[int, str], list[Row]] = {}   # the seeds of one (K, variant)
    for row in rows:
        groups.setdefault((row.workers, row.variant), []).append(row)
    singles = [summaries[r.name]["wall_s"] for r in groups.get((1, "single"), []) if r.name in summaries]
    single_wall = statistics.median(singles) if singles else None
    lines = []
    for (k, variant), group in groups.items():
        conv_lr, fc_lr = _lrs(group[0], base)
        line = {"workers": k, "variant": variant, "batches": group[0].batches(base.batch), "conv_lr": conv_lr,
                "fc_lr": fc_lr, "seeds": 0, "seeds_wanted": len(group), "runs": [r.name for r in group]}
        runs = [summaries[r.name] for r in group if r.name in summaries]
        if runs:
            top1 = [s["top1_error"] for s in runs]
            wall = statistics.median(s["wall_s"] for s in runs)
            line.update({
                "steps": runs[0]["steps"], "seeds": len(runs), "top1_error": statistics.mean(top1),
                "top1_error_median": statistics.median(top1), "top1_error_min": min(top1),
                "top1_error_max": max(top1), "top1_errors": top1,
                "top5_error": statistics.mean(s["top5_error"] for s in runs), "wall_s": wall,
                "wall_s_per_seed": [s["wall_s"] for s in runs],
                "time_ratio": single_wall / wall if single_wall else None,
                "images_per_s": statistics.median(s["images_per_s"] for s in runs),
                "mb_per_step": statistics.mean(s["bytes_per_step_total"] for s in runs) / 1e6,
                "finished_runs": [r.name for r in group if r.name in summaries]})
        lines.append(line)
    return lines


#: docs/PAPER.md's table (ImageNet, 8 GPUs at most): top-1 error by (K, variant)
PAPER = {(1, "single"): 42.33, (2, "hybrid-full"): 42.63, (2, "hybrid-worker"): 42.27, (4, "hybrid-full"): 42.59,
         (4, "hybrid-worker"): 42.44, (8, "hybrid-full"): 43.28, (8, "hybrid-worker"): 42.86}


def _table_line(r: dict) -> str:
    config = f"| {r['workers']} | {r['variant']} | {r['batches']} | {r['conv_lr']:g} | {r['fc_lr']:g} |"
    paper = PAPER.get((r["workers"], r["variant"]))
    paper_cell = f" {paper:.2f}% |" if paper is not None else " - |"
    if not r["seeds"]:
        return config + f" - | not finished (0 of {r['seeds_wanted']} seeds) | - | - | - | - | - | - |" + paper_cell
    spread = f"{100 * r['top1_error_min']:.2f}-{100 * r['top1_error_max']:.2f}%" if r["seeds"] > 1 else "-"
    seeds = f"{r['seeds']}" + (f" of {r['seeds_wanted']}" if r["seeds"] < r["seeds_wanted"] else "")
    ratio = f"{r['time_ratio']:.2f}x" if r["time_ratio"] else "-"
    return (config + f" {r['steps']} | {100 * r['top1_error']:.2f}% | {spread} | {seeds} | {100 * r['top5_error']:.2f}% | "
            f"{r['wall_s']:.0f} | {ratio} | {r['mb_per_step']:.3f} |" + paper_cell)


def findings(lines: list[dict]) -> list[str]:
    """The paper's two qualitative findings, each next to what this study measured."""
    by = {(r["workers"], r["variant"]): r for r in lines if r["seeds"]}
    one = by.get((1, "single"))
    k = max((r["workers"] for r in lines), default=1)
    out = ["Paper (ImageNet, 8 GPUs): K=8 at (1024, 1024) loses 0.95 points of top-1 error against one GPU "
           "(43.28% vs 42.33%); (1024, 128) loses 0.53 (42.86%): the (K*B, B) variant beats (K*B, K*B) at K=8."]
    if one is None or k == 1:
        return out + ["Measured: not yet (the one-worker row or every K > 1 row has not finished)."]
    parts = []
    for variant in VARIANTS:
        r = by.get((k, variant))
        if r is not None:
            parts.append(f"{variant} {r['batches']} {100 * r['top1_error']:.2f}% "
                         f"({100 * (r['top1_error'] - one['top1_error']):+.2f} points)")
    measured = (f"Measured at K={k} against one worker's {100 * one['top1_error']:.2f}% (mean over seeds): "
                + ("; ".join(parts) if parts else "no K=%d row has finished" % k) + ".")
    full, worker = by.get((k, "hybrid-full")), by.get((k, "hybrid-worker"))
    if full and worker:
        gap = 100 * (full["top1_error"] - worker["top1_error"])
        spread = 100 * max(full["top1_error_max"] - full["top1_error_min"],
                           worker["top1_error_max"] - worker["top1_error_min"])
        verdict = ("beats" if gap > 0 else "does not beat") + f" (K*B, K*B) by {abs(gap):.2f} points"
        measured += (f" (K*B, B) {verdict} at K={k}; the seeds of one row spread by up to {spread:.2f} points, "
                     + ("so the difference is within the seed-to-seed noise." if abs(gap) <= spread
                        else "so the difference is larger than the seed-to-seed noise."))
    return out + [measured]


def markdown(lines: list[dict], base: TrainConfig, command: str, scheme: str = "b") -> str:
    data = DATA_NAMES.get(base.data.partition(":")[0], base.data)
    if base.train_examples:
        data += f", a fixed class-stratified subset of {base.train_examples:,} training examples (`--train-examples`)"
    warm = (f", warm-up {base.warmup_epochs:g} epochs from one worker's rate (`--warmup-epochs`)"
            if base.warmup_epochs else "")
    out = [f"```\n{command}\n```\n",
           f"Model `{base.model}`, data {data}, B = {base.batch} per worker, {base.epochs:g} epochs, lr {base.lr:g} "
           f"(`--lr-scale {base.lr_scale}` for the conv layers){warm}, `--schedule {base.schedule}`, hybrid scheme "
           f"({scheme}). Top-1 error: mean over seeds. `time ratio`: one worker's wall time over this row's, on this "
           "machine (not a speedup claim: the bench measures speed). `paper`: docs/PAPER.md's ImageNet figure.\n",
           "| workers | strategy | (conv, FC) batch | conv lr | FC lr | steps | top-1 error | range over seeds | seeds | "
           "top-5 error | wall s | time ratio | MB per step | paper |",
           "|---:|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    out += [_table_line(r) for r in lines]
    out += ["", *findings(lines)]
    return "\n".join(out) + "\n"


FLOOR = 0.1  # %: a log axis cannot show 0 errors; they are drawn here


def plot_study(lines: list[dict], out_dir: Path, path: Path) -> Path:
    """Left: test top-1 error against epoch for K=1 and the largest K, every variant, every
    finished seed (dashed: seeds after the first). Right: final top-1 error against K per
    strategy (mean over seeds, bars from min to max). Log axes, 0 drawn at FLOOR."""
    fig = new_figure(13, 5)
    ax_curve, ax_final = fig.subplots(1, 2)
    k_max = max(r["workers"] for r in lines)
    shown = [r for r in lines if r["seeds"] and r["workers"] in (1, k_max)]
    for i, r in enumerate(shown):
        for j, name in enumerate(r["finished_runs"]):
            _, test = read_metrics(out_dir / "runs" / name)
            ax_curve.plot([t["epoch"] for t in test], [max(FLOOR, 100 * t["top1_error"]) for t in test],
                          color=f"C{i % 10}", lw=1.2, ls="-" if j == 0 else "--",
                          label=f"K={r['workers']} {r['variant']} {r['batches']}" if j == 0 else None)
    ax_curve.set_yscale("log")
    ax_curve.set_xlabel("epoch")
    ax_curve.set_ylabel(f"test top-1 error (%, log; 0 drawn at {FLOOR})")
    ax_curve.set_title(f"K=1 and K={k_max} (dashed: further seeds)", fontsize=9)
    ax_curve.grid(alpha=0.3, which="both")
    ax_curve.legend(fontsize=7)
    single = [r for r in lines if r["variant"] == "single" and r["seeds"]]
    for i, variant in enumerate(VARIANTS):
        pts = sorted(single + [r for r in lines if r["variant"] == variant and r["seeds"]], key=lambda r: r["workers"])
        if len(pts) < 2:
            continue
        ks = [r["workers"] * (1 + 0.03 * (i - 1)) for r in pts]  # nudged apart so the bars do not overlap
        mid, lo, hi = ([max(FLOOR, 100 * r[key]) for r in pts] for key in ("top1_error", "top1_error_min", "top1_error_max"))
        ax_final.errorbar(ks, mid, yerr=[[m - v for m, v in zip(mid, lo)], [v - m for m, v in zip(mid, hi)]],
                          marker="o", capsize=3, label=variant)
    ax_final.set_xscale("log", base=2)
    ax_final.set_yscale("log")
    ax_final.set_xlabel("workers K (same epochs; global batch K*B)")
    ax_final.set_ylabel("final test top-1 error (%, log): mean, min-max over seeds")
    ax_final.grid(alpha=0.3)
    ax_final.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def finished_summaries(rows: list[Row], base: TrainConfig, out: Path) -> dict[str, dict]:
    """The rows whose run directory holds a finished run of their configuration."""
    done = {}
    for row in rows:
        path = Path(row.config(base, out).out) / "summary.json"
        if path.is_file():
            summary = json.loads(path.read_text())
            if _matches(summary["config"], row.config(base, out)):
                done[row.name] = summary
    return done


def write_study(rows: list[Row], summaries: dict[str, dict], base: TrainConfig, out: Path, command: str,
                scheme: str = "b") -> list[dict]:
    """OUT.md, OUT.json and OUT.png from the rows finished so far; the table's lines."""
    lines = table_rows(rows, summaries, base)
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.md").write_text(markdown(lines, base, command, scheme))
    (out.parent / f"{out.name}.json").write_text(json.dumps({"command": command, "lines": lines}, indent=2))
    if any(r["seeds"] for r in lines):
        plot_study(lines, out, out.parent / f"{out.name}.png")
    return lines


def run_study(base: TrainConfig, workers: list[int], variants: list[str], seeds: list[int], out: Path,
              command: str, scheme: str = "b", train_rows: bool = True) -> list[dict]:
    """Train every row (``train_rows=False``: none, the table from what has finished), and
    rewrite OUT.md, OUT.json and OUT.png after each one; return the table's lines."""
    rows = study_rows(workers, variants, seeds, scheme)
    for row in rows:  # every configuration is checked before the first one trains
        row.config(base, out).validate()
    summaries = finished_summaries(rows, base, out)
    if train_rows:
        for row in rows:
            summaries[row.name] = run_row(row, base, out)
            write_study(rows, summaries, base, out, command, scheme)
    return write_study(rows, summaries, base, out, command, scheme)


