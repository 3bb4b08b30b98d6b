"""``onetrick simulate``: its arguments and its command.

It predicts, per strategy and worker count K, one worker's step time, the speedup over
one worker, the bytes each worker sends per step by tag and the share of communication
hidden behind compute, with the cost model of :mod:`onetrick.perf.predict.step`. Compute
per block is *measured* on this machine (profile ``this-cpu``, or ``this-device`` with
``--device cpu|cuda`` and ``--precision``: every trunk block timed at batch B, every fully-connected layer at the exact shard shape a strategy gives it, SGD's
update per parameter) or *counted* (a named GPU profile: FLOP at peak x achieved
efficiency, updates at memory bandwidth), or *measured elsewhere* (``h100``: the times
measured on one H100 at B=128, fp32 or bf16, split over the blocks by FLOP). With ``--cores C``, K workers of T threads on
C cores compute ``max(1, K*T/C)`` times slower. ``--validate BENCH.json`` predicts every
row of a bench result (:mod:`onetrick.perf.bench.model_check`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from onetrick.cli.parsing import comma_ints
from onetrick.config import ConfigError
from onetrick.perf.bench.model_check import validate
from onetrick.perf.bench.report import simulation_report, write_simulation
from onetrick.perf.measure.block_times import MeasuredCosts
from onetrick.perf.predict.blocks import model_blocks
from onetrick.perf.predict.compute import FlopCosts, ScaledCosts
from onetrick.perf.predict.hardware import NAMED_LINKS, PROFILES
from onetrick.perf.predict.step import STRATEGY_VARIANTS, Link, sweep

__all__ = ["add_parser", "cmd_simulate"]


def add_parser(sub) -> None:
    """Define ``onetrick simulate`` on the subparsers ``sub``."""
    p = sub.add_parser("simulate", help="cost model: predicted step time, speedup and bytes per strategy at K = 1..64",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="alexnet", help="smallnet | alexnet | alexnet2012")
    p.add_argument("--image-size", type=int, default=None, help="default: the model's")
    p.add_argument("--classes", type=int, default=1000, help="output classes of the simulated model")
    p.add_argument("--batch", type=int, default=128, help="per worker (B)")
    p.add_argument("--workers", type=comma_ints, default=[1, 2, 4, 8, 16, 32, 64], help="comma-separated K")
    p.add_argument("--strategies", default="single,data,model,hybrid",
                   help="comma-separated: single, data, model, hybrid (hybrid: every scheme and FC batch)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="this-cpu", help="compute costs: timed on this machine, or a named GPU profile")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="this-device: where the blocks are timed")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="this-device: autocast while timing; h100: which measured figures")
    p.add_argument("--efficiency", type=float, default=None, help="achieved fraction of the profile's peak FLOP/s")
    p.add_argument("--link", choices=list(NAMED_LINKS), default=None,
                   help="a named link (assumed): " + "; ".join(f"{n}: {v['gbps']:g} Gbit/s, {v['latency_us']:g} us"
                                                               for n, v in NAMED_LINKS.items())
                        + ". Default: the profile's own (this-cpu, this-device: unlimited, 50 us)")
    p.add_argument("--link-gbps", type=float, default=None, help="per-worker link, Gbit/s (default: --link's)")
    p.add_argument("--latency-us", type=float, default=None, help="per message (default: --link's)")
    p.add_argument("--collective-us", type=float, default=0.0,
                   help="fixed cost of every collective (software; bench measures it on a tiny all-reduce)")
    p.add_argument("--cores", type=int, default=None, help="this-cpu: model K workers time-sharing this many cores")
    p.add_argument("--threads", type=int, default=1, help="this-cpu: threads per worker while timing layers")
    p.add_argument("--reps", type=int, default=5, help="this-cpu: timed repetitions per layer (fastest kept)")
    p.add_argument("--validate", type=Path, action="append", default=[], metavar="BENCH.json",
                   help="also predict every row of a bench result and report the errors (repeatable)")
    p.add_argument("--validate-bytes", type=Path, action="append", default=[], metavar="BENCH.json",
                   help="compare only the bytes of a bench result with the formulas (repeatable; times nothing)")
    p.add_argument("--out", type=Path, default=None, help="write OUT.md, OUT.json and OUT.png")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Sweep the strategies over the worker counts, print the report, write OUT.md/.json/.png."""
    from onetrick.models import input_size

    prof = PROFILES[args.profile]
    image = args.image_size or input_size(args.model)
    blocks, model = model_blocks(args.model, args.classes, image, with_model=True)
    if args.profile in ("this-cpu", "this-device"):
        device = "cpu" if args.profile == "this-cpu" else args.device
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda given but no CUDA device is available")
        costs = MeasuredCosts(blocks, threads=args.threads, reps=args.reps, model=model, device=device,
                              precision=args.precision, overhead_rows=args.batch)
        rate = f"measured per layer on this machine's {device}" + (" in bf16" if args.precision == "bf16" else "")
    elif "measured" in prof:
        m = prof["measured"]
        costs = ScaledCosts(blocks, m[args.precision], m["batch"], prof["mem_gbs"])
        rate = (f"{args.precision} times measured at B={m['batch']} (trunk {m[args.precision]['trunk_ms']} ms, head "
                f"{m[args.precision]['head_ms']} ms, step {m[args.precision]['step_ms']} ms), split by FLOP")
    else:
        eff = args.efficiency or prof["efficiency"]
        costs = FlopCosts(blocks, prof["peak_flops"], eff, prof["mem_gbs"])
        rate = f"{prof['peak_flops'] / 1e12:.1f} TFLOP/s peak x {eff:.0%} achieved"
    name = args.link or prof["link"]
    spec = NAMED_LINKS.get(name, {"gbps": prof["link_gbps"], "latency_us": prof["latency_us"]})
    link = args.link_gbps if args.link_gbps is not None else spec["gbps"]
    lat = args.latency_us if args.latency_us is not None else spec["latency_us"]
    if name not in NAMED_LINKS or args.link_gbps is not None or args.latency_us is not None:
        name = None   # not one of the named links as it stands
    wanted = set(args.strategies.split(","))
    variants = [v for v in STRATEGY_VARIANTS if v.strategy in wanted or v.strategy == "single"]
    rows = sweep(blocks, costs, args.workers, args.batch, variants, Link(link, lat, args.collective_us), args.cores,
                 args.threads)
    title = (f"{args.model} {image}px, B={args.batch} per worker, profile {args.profile} ({rate}), "
             f"link {name + ' ' if name else ''}{link if link else 'unlimited'} Gbit/s, latency {lat:g} us"
             + (f" + {args.collective_us:g} us per collective" if args.collective_us else ""))
    validations = ([validate(v, reps=args.reps) for v in args.validate]
                   + [validate(v, bytes_only=True) for v in args.validate_bytes])
    paper = args.model.startswith("alexnet") and set(args.workers) >= {1, 2, 4, 8}
    report = simulation_report(title, rows, validations, paper)
    print(report)
    if args.out:
        command = ("onetrick " + " ".join(sys.argv[1:])
                   if sys.argv and sys.argv[0].endswith(("onetrick", "cli/main.py", "__main__.py")) else None)
        meta = {"command": command, "model": args.model, "image_size": image, "batch": args.batch,
                "profile": args.profile, "rate": rate, "link": name, "link_gbps": link, "latency_us": lat}
        written = write_simulation(args.out, report, meta, rows, validations, title,
                                   paper_plot=args.model.startswith("alexnet") and not args.profile.startswith("this-")
                                   and image == 224)
        print("wrote " + ", ".join(str(w) for w in written))
    return 0
