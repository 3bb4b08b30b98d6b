"""The ``onetrick`` command: train, eval, export, plot, study, bench, simulate."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from .config import (
    DATA_PARALLEL_SYNCS,
    DEVICES,
    FC_BATCHES,
    LR_SCALES,
    SCHEDULES,
    SCHEMES,
    STRATEGIES,
    ConfigError,
    TrainConfig,
)

D = TrainConfig()
ASYNC_MOMENTUM = 0.5


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a network (defaults: the small network on the bundled digits, one worker)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--model", default=D.model, help="smallnet | alexnet | alexnet2012")
    g.add_argument("--data", default=D.data, help="digits (bundled) | imagefolder:PATH | synthetic[:CLASSES]")
    g.add_argument("--image-size", type=int, default=None, help="input side; default: the model's (32 or 224)")
    g.add_argument("--dropout", type=float, default=D.dropout)
    g.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images (counted) instead of failing")
    g = p.add_argument_group("how long")
    g.add_argument("--batch", type=int, default=D.batch, help="examples per worker per step (the paper's B)")
    g.add_argument("--steps", type=int, default=None, help="training steps (overrides --epochs)")
    g.add_argument("--epochs", type=float, default=D.epochs)
    g = p.add_argument_group("recipe")
    g.add_argument("--lr", type=float, default=D.lr, help="weight learning rate at one worker; biases get --bias-lr-mult x")
    g.add_argument("--momentum", type=float, default=None,
                   help=f"default {D.momentum}; {ASYNC_MOMENTUM} for hogwild/paramserver, whose staleness already acts as "
                        "momentum (Mitliagkas et al. 2016): at 0.9 they stalled at chance in about half the runs")
    g.add_argument("--weight-decay", type=float, default=D.weight_decay, help="on weights only")
    g.add_argument("--bias-lr-mult", type=float, default=D.bias_lr_mult)
    g.add_argument("--lr-mult", action="append", default=[], metavar="GLOB=MULT",
                   help="per-layer lr multiplier on parameter names, e.g. 'head.*=0.5' (repeatable)")
    g.add_argument("--schedule", choices=SCHEDULES, default=D.schedule)
    g.add_argument("--lr-drops", type=lambda s: tuple(float(x) for x in s.split(",")), default=D.lr_drops,
                   help="fractions of training where the step schedule multiplies lr by --lr-drop-factor")
    g.add_argument("--lr-drop-factor", type=float, default=D.lr_drop_factor)
    g.add_argument("--lr-scale", choices=LR_SCALES, default=D.lr_scale, help="lr scaling for a K-times larger batch")
    g.add_argument("--seed", type=int, default=D.seed)
    g = p.add_argument_group("parallelism")
    g.add_argument("--workers", type=int, default=None,
                   help="K worker processes (or one per GPU); default 1, or under torchrun its processes (less --servers)")
    g.add_argument("--strategy", choices=STRATEGIES, default=None, help="default: single for 1 worker, data otherwise")
    g.add_argument("--sync", choices=DATA_PARALLEL_SYNCS, default=D.sync, help="data parallelism: DDP or the paper's sharded update")
    g.add_argument("--scheme", choices=SCHEMES, default=None, help="hybrid: how last-conv activations reach the FC layers (default b)")
    g.add_argument("--fc-batch", choices=FC_BATCHES, default=D.fc_batch, help="hybrid: FC updated once (K*B) or per round (B)")
    g.add_argument("--servers", type=int, default=D.servers, help="paramserver: server processes")
    g.add_argument("--fetch-every", type=int, default=D.fetch_every, help="paramserver: fetch weights every N steps")
    g.add_argument("--push-every", type=int, default=D.push_every, help="paramserver: push gradients every N steps")
    g.add_argument("--device", choices=DEVICES, default=D.device)
    g.add_argument("--threads", type=int, default=None, help="CPU threads per worker (default: cores / workers)")
    g.add_argument("--timeout", dest="timeout_s", type=float, default=D.timeout_s, help="seconds before a stuck collective fails")
    g.add_argument("--max-restarts", type=int, default=D.max_restarts, help="restart the job this many times after a worker dies")
    g = p.add_argument_group("run directory")
    g.add_argument("--out", type=Path, default=D.out, help="run directory: metrics.jsonl, summary.json, checkpoints/")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--eval-every", type=int, default=D.eval_every, help="test error every N steps")
    g.add_argument("--eval-views", type=int, choices=(1, 10), default=D.eval_views, help="1: centre crop, 10: corners+centre, flipped")
    g.add_argument("--log-every", type=int, default=D.log_every)
    g.add_argument("--ckpt-every", type=int, default=D.ckpt_every)
    g.add_argument("--on-nan", choices=("stop", "skip"), default=D.on_nan, help="a non-finite loss stops training (noticed at the next logging or checkpoint step, "
                   "so within --log-every steps; no checkpoint is written after it) or skips the "
                   "step on the device (weights and momentum kept)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values["workers"] = _workers(args)
    if values.get("strategy") is None:
        values["strategy"] = "single" if values["workers"] == 1 else "data"
    if args.momentum is None and values["strategy"] in ("hogwild", "paramserver"):
        values["momentum"] = ASYNC_MOMENTUM
    if values["strategy"] == "hybrid" and args.scheme is None:
        values["scheme"] = "b"
    return TrainConfig(**values)


def _workers(args: argparse.Namespace) -> int:
    """--workers, checked against the processes torchrun started (their count includes
    the parameter servers)."""
    from .distributed.runtime import under_torchrun

    if not under_torchrun() or args.strategy == "hogwild":
        return D.workers if args.workers is None else args.workers
    servers = args.servers if args.strategy == "paramserver" else 0
    started = int(os.environ["WORLD_SIZE"])
    if args.workers is not None and args.workers + servers != started:
        raise ConfigError(f"--workers {args.workers}" + (f" + --servers {servers}" if servers else "")
                          + f" does not match the {started} processes torchrun started (WORLD_SIZE)")
    return started - servers


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = config_from_args(args)
    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every process gets here; one line is enough
        return 0
    print(f"test top-1 error {summary['top1_error']:.2%} (accuracy {1 - summary['top1_error']:.2%}), "
          f"top-5 error {summary['top5_error']:.2%}, {summary['images_per_s']:.0f} images/s, "
          f"{summary['bytes_per_step_total'] / 1e6:.3f} MB sent per worker per step; run directory {cfg.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .export import evaluate_run

    result = evaluate_run(args.run, views=args.views, data=args.data)
    print(json.dumps(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    path = export_run(args.run, args.output)
    print(f"wrote {path}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .export import first_layer_weight
    from .plot import plot_curves, plot_filters

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_curves([Path(r) for r in args.runs], out / "curves.png")]
    if not args.no_filters:
        written.append(plot_filters(first_layer_weight(Path(args.runs[0])), out / "filters.png"))
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="onetrick", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    p = sub.add_parser("eval", help="test error of a run's newest checkpoint")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--views", type=int, choices=(1, 10), default=1)
    p.add_argument("--data", default=None, help="data spec (default: the run's)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("export", help="write a run's newest checkpoint as one plain state_dict file")
    p.add_argument("run", type=Path)
    p.add_argument("-o", "--output", type=Path, default=None, help="default: RUN/model.pt")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("plot", help="error curves of runs and first-layer filters (PNG)")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("-o", "--output", default="plots", help="output folder")
    p.add_argument("--no-filters", action="store_true")
    p.set_defaults(func=cmd_plot)
    from .study import add_parser as add_study_parser

    add_study_parser(sub)
    try:
        from .bench import add_parsers
        add_parsers(sub)
    except ImportError:
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        args.func = cmd_train
    from .checkpoint import CheckpointError
    from .data import DataError
    from .distributed.runtime import WorkerFailure
    from .train import NonFiniteLoss

    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, WorkerFailure, NonFiniteLoss, FileNotFoundError) as err:
        print(f"onetrick: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onetrick: interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
