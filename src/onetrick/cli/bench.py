"""``onetrick bench``: its arguments and its command (the work is in
:mod:`onetrick.perf.bench.runner`, the tables in :mod:`onetrick.perf.bench.report`)."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from onetrick.cli.parsing import comma_choices, comma_ints
from onetrick.config import DATA_PARALLEL_SYNCS, DEVICES, FC_BATCHES, PRECISIONS, SCHEMES, ConfigError, TrainConfig
from onetrick.perf.bench.jobs import BenchSpec
from onetrick.perf.bench.report import bench_report, write_bench
from onetrick.perf.bench.runner import run_bench

__all__ = ["add_parser", "cmd_bench"]


def add_parser(sub) -> None:
    """Define ``onetrick bench`` on the subparsers ``sub``."""
    p = sub.add_parser("bench", help="time strategies x worker counts on synthetic data; bytes per step; optional shaped link",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smallnet", help="smallnet | alexnet | alexnet2012")
    p.add_argument("--image-size", type=int, default=None, help="default: the model's (32 or 224)")
    p.add_argument("--data", default="synthetic:1000", help="synthetic[:CLASSES] (images generated per index)")
    p.add_argument("--strategies", type=comma_choices(("single", "independent", "data", "model", "hybrid"), "strategy"),
                   default=["single", "data", "hybrid"],
                   help="comma-separated; single is the K=1 row every speedup is relative to; independent: K "
                        "one-worker processes that never communicate (barriers only): this machine's ceiling for K")
    p.add_argument("--workers", type=comma_ints, default=[1, 2], help="comma-separated worker counts K")
    p.add_argument("--batch", type=int, default=32, help="examples per worker per step (B)")
    p.add_argument("--sync", type=comma_choices(DATA_PARALLEL_SYNCS, "--sync"), default=["ddp"], help="data parallelism: ddp,sharded")
    p.add_argument("--scheme", type=comma_choices(SCHEMES, "scheme"), default=["b"], help="hybrid schemes: a,b,c")
    p.add_argument("--fc-batch", type=comma_choices(FC_BATCHES, "--fc-batch"), default=["full"], help="hybrid FC batch: full (K*B), worker (B)")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="cpu (gloo) or cuda (NCCL; worker i on GPU i)")
    p.add_argument("--precision", type=comma_choices(PRECISIONS, "--precision"), default=["fp32"],
                   help="compute precisions, comma-separated (fp32,bf16: each configuration at both; speedups "
                        "are over the first's single row)")
    p.add_argument("--comm-dtype", type=comma_choices(PRECISIONS, "--comm-dtype"), default=["fp32"],
                   help="dtypes on the wire, comma-separated (fp32,bf16: each multi-worker row at both)")
    p.add_argument("--all-at-one", action="store_true",
                   help="at K=1 time every listed strategy too (its cost on one worker), not only single")
    p.add_argument("--steps", type=int, default=10, help="measured steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="steps before measuring")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per worker (the 1-worker row uses the same)")
    p.add_argument("--link-mbps", default=None,
                   help="run the workers as hosts in network namespaces on links shaped to N Mbit/s (needs root); "
                        "'paper' = this CPU's matmul FLOP/s at the paper's ~167 FLOP per byte")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every configuration this many times, interleaved; report the fastest of the rounds in "
                        "which other processes used least CPU (all rounds are kept in the JSON)")
    p.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                   help="before each configuration wait up to S seconds for other processes to use < 0.3 cores")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout rate in the timed steps")
    p.add_argument("--seed", type=int, default=0, help="initial weights and synthetic data")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a stuck collective fails")
    p.add_argument("--memory-per-worker", type=float, default=None, metavar="GB",
                   help="memory each worker may use; a job predicted to need more is left out before launch (default: "
                        "CPU: this machine's available memory / K, which also caps a larger figure; CUDA: the GPU's "
                        "memory)")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain PyTorch loop in the one-worker job")
    p.add_argument("--validate-plan", action="store_true",
                   help="run every candidate the planner can pick (overrides --strategies/--sync/--scheme/--fc-batch) "
                        "and report its pick against the best measured")
    p.add_argument("--out", type=Path, default=None, help="write OUT.md, OUT.json and OUT.png")
    p.set_defaults(func=cmd_bench)


def bench_spec(args: argparse.Namespace) -> BenchSpec:
    """The runner's input from the parsed options (the runner reads no argparse namespace)."""
    return BenchSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchSpec)})


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the bench, print the report, write OUT.md/.json/.png."""
    from onetrick.perf.bench.netns import NetnsError

    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.rounds < 1:
        raise ConfigError("--steps, --batch and --rounds must be at least 1, --warmup at least 0")
    from onetrick.run.description import check_model_and_data

    check_model_and_data(TrainConfig(model=args.model, data=args.data, image_size=args.image_size))
    if args.validate_plan:
        from onetrick.perf.bench.plan_check import PLAN_STRATEGIES

        for name, value in PLAN_STRATEGIES.items():
            setattr(args, name, value)
    try:
        result = run_bench(bench_spec(args), log=lambda s: print(s, file=sys.stderr, flush=True))
    except NetnsError as err:
        print(f"onetrick: error: {err}", file=sys.stderr)
        return 2
    argv = sys.argv[1:] if sys.argv and sys.argv[0].endswith(("onetrick", "cli/main.py")) else None
    result["command"] = ("onetrick " + shlex.join(argv)) if argv and argv[0] == "bench" else None
    report = bench_report(result)
    if args.validate_plan:
        from onetrick.perf.bench.plan_check import plan_report, validate_plan

        result["validate_plan"] = validate_plan(result)
        report += "\n\n" + plan_report(result["validate_plan"])
    print(report)
    if args.out:
        written = write_bench(result, args.out)
        if args.validate_plan:
            written[0].write_text(report + "\n")
        print("wrote " + ", ".join(str(w) for w in written))
    return 0
