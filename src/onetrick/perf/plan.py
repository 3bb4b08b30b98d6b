"""``onetrick plan`` and the resolution of ``train --strategy auto`` / ``--scheme auto``.

``onetrick plan --model M --workers K --batch B [--link NAME | measured | MBPS]`` prints every
candidate of :mod:`onetrick.perf.planner` (predicted step ms, speedup, bytes by tag,
exposed communication) and the choice with its reason in one line; ``--json`` prints
the same as one JSON object. :func:`resolve_auto` runs the same planner once in the
launcher, before any worker starts, so every worker runs one concrete configuration.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from ..argtypes import link_mbps, named_link
from ..config import FC_BATCHES, ConfigError, TrainConfig
from .costmodel import Link
from .costs import NAMED_LINKS, PROFILES, FlopCosts
from .planner import Plan, make_plan, measured_costs
from .probe import loopback_link, measured_link

__all__ = ["add_parser", "cmd_plan", "format_plan", "resolve_auto"]


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


def plan_memory(model: str, classes: int, channels: int, image: int, k: int, given_gb: float | None, device: str,
                cfg: TrainConfig | None = None, run: str = "train", here: bool = False):
    """The planner's memory check: ``(predict(variant, k, batch), bytes per worker, where
    that figure comes from)``. Each candidate is predicted as ``train`` would hold it (the
    model on the meta device, :mod:`onetrick.perf.memory_model`). The memory per worker is
    ``--memory-per-worker`` when given, else detected (CPU: available memory / K; a GPU
    profile planned on this machine has no detected limit). ``run="bench"``: as the bench's
    steps alone hold it. ``here``: the workers run on this machine (``train --strategy
    auto``, a bench's validation): a given figure is capped at their share of it."""
    from .memory import available_memory
    from .memory_model import predict_memory
    from .netmemory import net_memory

    net = net_memory(model, classes, channels, image, cfg.dropout if cfg else 0.5)
    extra = ({"precision": cfg.precision, "on_nan": cfg.on_nan, "weight_decay": cfg.weight_decay > 0}
             if cfg is not None else {})

    def predict(variant, workers, batch):
        return predict_memory(net, variant, workers, batch, device=device, run=run, **extra)

    if given_gb is None and device != "cpu" and cfg is None:
        return predict, None, "no limit given"
    available, source = available_memory(device, k, given_gb=given_gb, here=here)
    return predict, available, source


def time_share(k: int, threads: int, cores: int | None = None) -> float:
    """K workers of T threads on ``cores`` (default: this machine's): each gets ``cores / (K*T)`` of a core."""
    return max(1.0, k * threads / (cores or os.cpu_count() or 1))


def _default_threads(k: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, k))


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan, then print the table (or JSON)."""
    from ..models import check_model, input_size

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
    threads = args.threads or _default_threads(args.workers)
    blocks, costs = measured_costs(args.model, classes, 3, image, args.batch, threads)
    slow = time_share(args.workers, threads)
    link, probe, named = _link(choice, args.workers, args.collective_us, threads, args.profile == "this-cpu")
    if args.profile != "this-cpu":   # GPUs: nothing time-shares this machine's cores
        prof = PROFILES[args.profile]
        costs, slow = FlopCosts(blocks, prof["peak_flops"], prof["efficiency"], prof["mem_gbs"]), 1.0
    memory, available, source = plan_memory(args.model, classes, 3, image, args.workers, args.memory_per_worker,
                                            "cpu" if args.profile == "this-cpu" else "cuda")
    try:
        plan = make_plan(blocks, costs, args.workers, args.batch, link, slow, args.fc_batch, memory=memory,
                         available=available, available_from=source)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    record = {"model": args.model, "image_size": image, "classes": classes, "threads": threads,
              "profile": args.profile, "link_probe": probe, "planner_s": time.perf_counter() - t0, **plan.as_dict()}
    record["link"] = {**named, **record["link"]}   # the link used: its name, Gbit/s, latency, fixed costs
    print(json.dumps(record, indent=2) if args.json else format_plan(plan, record))
    return 0


def format_plan(plan: Plan, record: dict) -> str:
    """The candidates as a Markdown table, fastest first, and the choice in one line."""
    lk, name = plan.link, record["link"].get("name", "given")
    head = (f"{record['model']} {record['image_size']}px, {record['classes']} classes, K={plan.k}, B={plan.batch} per "
            f"worker, {record['threads']} thread(s) per worker, link {name}: "
            f"{f'{lk.gbps:.4g} Gbit/s' if lk.gbps else 'unlimited'}, {lk.latency_us:g} us per message + "
            f"{lk.collective_us:.0f} us per collective"
            + (f" + {lk.sync_us / 1e3:.1f} ms per rendezvous on shared cores" if lk.sync_us else "")
            + f" ({record['link_probe'].get('kind', 'none')})")
    lines = [head, "", "| plan | batch | step ms | speedup | MB sent per worker per step, by tag | exposed ms | "
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
                      "as `onetrick train` holds them (perf/memory_model.py)"]
    lines += ["", f"choice: {plan.reason}", f"(planned in {record['planner_s']:.1f} s)"]
    return "\n".join(lines)


def resolve_auto(cfg: TrainConfig, log=print) -> TrainConfig:
    """``--strategy auto`` / ``--scheme auto`` -> the planner's runnable choice, with the
    plan (choice, reason, every candidate's prediction, the link, the planner's own
    seconds) in ``cfg.plan``. Other configurations are returned unchanged. ``fc_batch``
    stays the user's; model parallelism is planned at K*B examples per worker, the same
    SGD step as the others."""
    from ..distributed.runtime import under_torchrun

    auto_scheme = cfg.strategy == "hybrid" and cfg.scheme == "auto"
    if cfg.strategy != "auto" and not auto_scheme:
        return cfg
    unplannable = ("under torchrun (each process would plan alone)" if under_torchrun()
                   else "with --device cuda (layers are timed on the CPU)" if cfg.device != "cpu" else None)
    if unplannable and auto_scheme:  # the hybrid's default: fall back to the paper's scheme, and say so
        if os.environ.get("RANK", "0") == "0":
            log(f"plan: hybrid/b: --scheme auto is not planned {unplannable}; using the paper's scheme b")
        return cfg.replace(scheme="b")
    if unplannable:
        raise ConfigError(f"--strategy auto is not planned {unplannable}; name the strategy (e.g. --strategy hybrid)")
    if cfg.workers == 1:
        resolved = cfg.replace(strategy="single", scheme=None) if cfg.strategy == "auto" else cfg.replace(scheme="b")
        log(f"plan: {resolved.strategy}{'/b' if auto_scheme else ''}: one worker, nothing to plan")
        return resolved.replace(plan={"choice": {"label": resolved.strategy}, "reason": "one worker", "candidates": []})
    t0 = time.perf_counter()
    from ..worker import run_data

    data = run_data(cfg)
    threads = cfg.threads or _default_threads(cfg.workers)
    blocks, costs = measured_costs(cfg.model, data.num_classes, data.in_channels, data.image_size, cfg.batch, threads)
    probe = measured_link(cfg.workers, threads)
    memory, available, source = plan_memory(cfg.model, data.num_classes, data.in_channels, data.image_size,
                                            cfg.workers, cfg.memory_per_worker, cfg.device, cfg, here=True)
    try:
        plan = make_plan(blocks, costs, cfg.workers, cfg.batch, Link.from_measured(probe), time_share(cfg.workers, threads),
                         cfg.fc_batch, "hybrid" if auto_scheme else None, cfg.cut if auto_scheme else None,
                         cfg.lr_scale, runnable_only=True, memory=memory, available=available, available_from=source)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    v = plan.choice.variant
    resolved = cfg.replace(strategy=v.strategy, sync=v.sync or cfg.sync, scheme=v.scheme, cut=v.cut,
                           batch=plan.choice.batch)
    record = {"auto": "scheme" if auto_scheme else "strategy", "threads": threads, "link_probe": probe,
              "planner_s": time.perf_counter() - t0, **plan.as_dict()}
    log(f"plan: {plan.reason} (planned in {record['planner_s']:.1f} s)")
    return resolved.replace(plan=record)
