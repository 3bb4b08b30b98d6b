"""``onetrick plan`` and the resolution of ``train --strategy auto`` / ``--scheme auto``.

``onetrick plan --model M --workers K --batch B [--link NAME | measured | MBPS]`` prints every
candidate of :mod:`onetrick.perf.planner` (predicted step ms, speedup, bytes by tag,
exposed communication) and the choice with its reason in one line; ``--json`` prints
the same as one JSON object. Its header says what each worker is (threads of this CPU, or
one GPU of a profile, in which precision, and where the profile's figures come from) and
what the plan assumes of DDP's overlap. ``train --strategy auto`` runs the same planner
once (:mod:`onetrick.run.auto`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

from onetrick.config import FC_BATCHES, ConfigError
from onetrick.perf.measure.block_times import HEAD_WIDTH
from onetrick.perf.measure.links import loopback_link
from onetrick.perf.measure.shared_host import measured_link, time_share
from onetrick.perf.planner import Plan, default_threads, make_plan, measured_costs, plan_memory
from onetrick.perf.predict.blocks import Block, model_blocks
from onetrick.perf.predict.compute import CostProvider, FlopCosts
from onetrick.perf.predict.hardware import NAMED_LINKS, PROFILES, link_mbps, named_link
from onetrick.perf.predict.schedule import DDP_BUCKET, DDP_FIRST_BUCKET
from onetrick.perf.predict.step import Link

__all__ = ["add_parser", "cmd_plan", "ddp_overlap", "format_plan"]

#: the precision of a GPU profile's plan: :class:`~onetrick.perf.predict.compute.FlopCosts`
#: runs at the profile's ``peak_flops``, its fp32 peak
GPU_PRECISION = "fp32"


def add_parser(sub) -> None:
    """Define ``onetrick plan`` on the subparsers ``sub``."""
    p = sub.add_parser("plan", help="predict every way to parallelise a model at K workers; choose one, say why",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smallnet", help="smallnet | alexnet | alexnet2012 | torchvision:NAME")
    p.add_argument("--workers", type=int, default=2, help="K")
    p.add_argument("--batch", type=int, default=32, help="examples per worker per step (B)")
    p.add_argument("--image-size", type=int, default=None, help="default: the model's")
    p.add_argument("--classes", type=int, default=None, help="default: 10 for smallnet (digits), 1000 otherwise")
    p.add_argument("--fc-batch", choices=FC_BATCHES, default="full", help="hybrid FC batch (changes the maths: kept)")
    p.add_argument("--link", default=None, metavar="NAME|measured|MBPS",
                   help="the workers' link (per worker, per direction; assumed, not measured): "
                        + "; ".join(f"{n}: {v['gbps']:g} Gbit/s, {v['latency_us']:g} us per message ({v['note']})"
                                    for n, v in NAMED_LINKS.items())
                        + "; measured: gloo between K local CPU workers, probed now (this-cpu, this-device only); "
                          "a number: Mbit/s. Default: the profile's own link (measured for this-cpu)")
    p.add_argument("--link-mbps", default=None, help="the same as --link N (Mbit/s) or --link measured")
    p.add_argument("--collective-us", type=float, default=0.0, help="with a given link: fixed cost per collective")
    p.add_argument("--profile", choices=sorted(p for p in PROFILES if p != "this-device"), default="this-cpu",
                   help="this-cpu: layers timed here; else FLOP at a GPU profile's rate")
    p.add_argument("--threads", type=int, default=None, help="threads per worker (default: cores / K, at least 1)")
    p.add_argument("--memory-per-worker", type=float, default=None, metavar="GB",
                   help="memory each worker has (GB); candidates whose predicted peak exceeds it are dropped. Default: "
                        "this-cpu: this machine's available memory / K; a GPU profile: no limit")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=cmd_plan)


def _link_choice(link: str | None, mbps: str | None, profile: str) -> str | float:
    """``--link`` / ``--link-mbps`` -> a name of :data:`NAMED_LINKS`, ``"measured"`` or
    Mbit/s; by default the profile's own link. ``measured`` probes this machine's loopback
    between CPU processes, so a GPU profile refuses it (one line, before anything is probed)."""
    if link is not None and mbps is not None:
        raise ConfigError("give --link or --link-mbps, not both")
    if mbps is not None:
        choice = "measured" if mbps == "measured" else link_mbps(mbps, "measured")
    elif link is not None:
        choice = named_link(link, NAMED_LINKS)
    else:
        choice = PROFILES[profile]["link"]
    own = PROFILES[profile]["link"]
    if choice == "measured" and own != "measured":
        raise ConfigError(f"--link measured probes this machine's loopback between CPU processes; the {profile} "
                          f"profile's workers talk over {NAMED_LINKS[own]['note']}: name a link, e.g. --link {own}")
    return choice


def _link(choice: str | float, k: int, collective_us: float, threads: int, this_cpu: bool) -> tuple[Link, dict, dict]:
    """The link the plan assumes, what was measured of it, and its name. For workers on this
    machine's CPU the probe also measures what they pay as busy workers and each gloo op's
    bandwidth, and a given or named bandwidth keeps those terms; for a GPU profile nothing
    is probed (its link is named or given: :func:`_link_choice`)."""
    if k == 1 or not this_cpu and choice != "measured":
        probe = {}
    else:
        probe = measured_link(k, threads) if this_cpu else loopback_link(k)
    if choice == "measured":
        link = Link.from_measured(probe)
        return (link if this_cpu else link.idle()), probe, {"name": "measured", "note": probe.get("kind", "one worker")}
    if isinstance(choice, float):
        gbps, latency_us, named = choice / 1e3, 0.0, {"name": f"{choice:g} Mbit/s", "note": "given"}
    else:
        spec = NAMED_LINKS[choice]
        gbps, latency_us, named = spec["gbps"], spec["latency_us"], {"name": choice, "note": spec["note"] + ", assumed"}
    here = dataclasses.replace(Link.from_measured(probe), gbps=gbps, latency_us=latency_us, collective_us=collective_us)
    kind = "given" if isinstance(choice, float) else f"named: {named['note']}"
    return here, {"kind": kind, "measured_mbps": gbps * 1e3, "sync_us": here.sync_us,
                  "overlap_us_per_mb": here.overlap_us_per_mb, "op_factor": here.op_factor,
                  "large_op_factor": here.large_op_factor}, named


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan, then print the table (or JSON)."""
    from onetrick.models import check_model, input_size

    try:
        check_model(args.model, args.image_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if args.workers < 1 or args.batch < 1:
        raise ConfigError(f"--workers and --batch must be at least 1 (got {args.workers} and {args.batch})")
    choice = _link_choice(args.link, args.link_mbps, args.profile)
    t0 = time.perf_counter()
    image = args.image_size or input_size(args.model)
    classes = args.classes or (10 if args.model == "smallnet" else 1000)
    threads = args.threads or default_threads(args.workers)
    blocks, costs, slow, compute = _costs(args, classes, image, threads)
    link, probe, named = _link(choice, args.workers, args.collective_us, threads, args.profile == "this-cpu")
    memory, available, source = plan_memory(args.model, classes, 3, image, args.workers, args.memory_per_worker,
                                            "cpu" if args.profile == "this-cpu" else "cuda")
    try:
        plan = make_plan(blocks, costs, args.workers, args.batch, link, slow, args.fc_batch, memory=memory,
                         available=available, available_from=source)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    record = {"model": args.model, "image_size": image, "classes": classes, "threads": threads,
              "profile": args.profile, "link_probe": probe, "planner_s": time.perf_counter() - t0, **plan.as_dict(),
              **compute, "ddp_overlap": ddp_overlap(plan)}
    record["link"] = {**named, **record["link"]}   # the link used: its name, Gbit/s, latency, fixed costs
    print(json.dumps(record, indent=2) if args.json else format_plan(plan, record))
    return 0


def _costs(args: argparse.Namespace, classes: int, image: int,
           threads: int) -> tuple[list[Block], CostProvider, float, dict[str, str]]:
    """The blocks, their costs, what K workers sharing cores multiply compute by, and what
    the plan assumes of each worker (``per_worker``, ``compute``: the header's words).
    this-cpu: every layer timed here (a real model, its classifier narrow: planner.measured_costs);
    a GPU profile: FLOP counts of the model on the meta device, no real model, nothing timed."""
    if args.profile == "this-cpu":
        blocks, costs = measured_costs(args.model, classes, 3, image, args.batch, threads)
        wide = any(b.linear and b.linear[1] > HEAD_WIDTH for b in blocks)
        rows = costs.max_rows if costs.max_rows and costs.max_rows < args.workers * args.batch else None
        return blocks, costs, time_share(args.workers, threads), {
            "per_worker": f"{threads} thread(s) per worker",
            "compute": f"every layer timed on this machine's CPU, fp32, {threads} thread(s) per worker"
                       + (f"; a head Linear wider than {HEAD_WIDTH} outputs timed at {HEAD_WIDTH} and scaled by its "
                          "width" if wide else "")
                       + (f"; the trunk timed on at most {rows} examples and scaled by the examples" if rows else "")}
    prof = PROFILES[args.profile]
    blocks = model_blocks(args.model, classes, image)
    costs = FlopCosts(blocks, prof["peak_flops"], prof["efficiency"], prof["mem_gbs"])
    return blocks, costs, 1.0, {
        "per_worker": f"one {args.profile} GPU per worker ({GPU_PRECISION})",
        "compute": (f"{args.profile} profile, {GPU_PRECISION}: each block's multiply-adds at "
                    f"{prof['peak_flops'] / 1e12:g} TFLOP/s peak x {prof['efficiency']:.0%} achieved, updates at "
                    f"{prof['mem_gbs']:g} GB/s; the profile: {prof['note']}")}


def ddp_overlap(plan: Plan) -> str | None:
    """What the plan assumes of DDP's all-reduce and how much of it that hides
    (perf/predict/schedule.py's ``_data_ddp``): each bucket is all-reduced as soon as
    backward has finished its gradients, on a link that runs beside the compute; what is
    still on the link when backward ends is exposed. None without a data/ddp candidate."""
    ddp = next((c for c in plan.candidates if c.label == "data/ddp"), None)
    if ddp is None or not ddp.result.comm_s:
        return None
    r, steal = ddp.result, plan.link.overlap_us_per_mb
    cost = f"{steal:.0f} us of compute lost per MB sent, measured" if steal else "no compute lost to it"
    return (f"DDP (data/ddp): gradient buckets ({DDP_FIRST_BUCKET >> 20} MiB, then {DDP_BUCKET >> 20} MiB) all-reduced "
            f"as backward finishes them, overlapping the rest of backward (assumed: the link runs beside compute, "
            f"{cost}): {r.exposed_s * 1e3:.1f} ms of {r.comm_s * 1e3:.1f} ms of communication exposed")


def format_plan(plan: Plan, record: dict) -> str:
    """The candidates as a Markdown table, fastest first, and the choice in one line; the
    header says what each worker is and what the plan assumes of it."""
    lk, name = plan.link, record["link"].get("name", "given")
    head = (f"{record['model']} {record['image_size']}px, {record['classes']} classes, K={plan.k}, B={plan.batch} per "
            f"worker, {record['per_worker']}, link {name}: "
            f"{f'{lk.gbps:.4g} Gbit/s' if lk.gbps else 'unlimited'}, {lk.latency_us:g} us per message + "
            f"{lk.collective_us:.0f} us per collective"
            + (f" + {lk.sync_us / 1e3:.1f} ms per rendezvous on shared cores" if lk.sync_us else "")
            + f" ({record['link_probe'].get('kind', 'none')})")
    lines = [head, f"compute: {record['compute']}", "",
             "| plan | batch | step ms | speedup | MB sent per worker per step, by tag | exposed ms | "
             "memory per worker GB | runnable |",
             "|---|---:|---:|---:|---|---:|---:|---|"]
    for c in plan.candidates:
        r = c.result
        tags = ", ".join(f"{t} {n / 1e6:.2f}" for t, n in sorted(r.bytes.items()) if n) or "none"
        mem = "-" if c.memory_bytes is None else f"{c.memory_bytes / 1e9:.2f}" + ("" if c.fits else " (does not fit)")
        lines.append(f"| {c.label} | {c.batch} | {r.step_s * 1e3:.1f} | {c.speedup:.2f}x | {tags} | "
                     f"{r.exposed_s * 1e3:.1f} | {mem} | {'yes' if c.runnable else 'planned'} |")
    if plan.available is not None:
        lines += ["", f"memory per worker: {plan.available / 1e9:.1f} GB ({plan.available_from}); predicted peaks "
                      "as `onetrick train` holds them (perf/predict/memory.py)"]
    if record.get("ddp_overlap"):
        lines += ["", record["ddp_overlap"]]
    lines += ["", f"choice: {plan.reason}", f"(planned in {record['planner_s']:.1f} s)"]
    return "\n".join(lines)
