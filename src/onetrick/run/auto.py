"""``train --strategy auto`` / ``--scheme auto``: the planner run once in the launcher,
before any worker starts, so every worker runs one concrete configuration."""
from __future__ import annotations

import os
import time

from onetrick.config import ConfigError, TrainConfig
from onetrick.perf.measure.shared_host import measured_link, time_share
from onetrick.perf.planner import default_threads, make_plan, measured_costs, plan_memory
from onetrick.perf.predict.step import Link
from onetrick.run.description import ModelDescription


def resolve_auto(cfg: TrainConfig, desc: ModelDescription, log=print) -> TrainConfig:
    """``--strategy auto`` / ``--scheme auto`` -> the planner's runnable choice, with the
    plan (choice, reason, every candidate's prediction, the link, the planner's own
    seconds) in ``cfg.plan``. Other configurations are returned unchanged. ``fc_batch``
    stays the user's; model parallelism is planned at K*B examples per worker, the same
    SGD step as the others. ``desc``: the run's model and data, described once
    (``run/description.py``): every candidate's memory is predicted from it; the layers'
    times come from one real model, built and timed here."""
    from onetrick.distributed.runtime import under_torchrun

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
    threads = cfg.threads or default_threads(cfg.workers)
    blocks, costs = measured_costs(cfg.model, desc.classes, desc.channels, desc.image_size, cfg.batch, threads)
    probe = measured_link(cfg.workers, threads)
    memory, available, source = plan_memory(cfg.model, desc.classes, desc.channels, desc.image_size, cfg.workers,
                                            cfg.memory_per_worker, cfg.device, cfg, here=True, net=desc.net)
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
