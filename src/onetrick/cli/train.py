"""``onetrick train``: its arguments, the :class:`TrainConfig` they make, and the command."""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from onetrick.cli.parsing import fractions
from onetrick.config import (
    DATA_PARALLEL_SYNCS,
    DEVICES,
    FC_BATCHES,
    LR_SCALES,
    PRECISIONS,
    SCHEDULES,
    SCHEMES,
    STRATEGIES,
    ConfigError,
    TrainConfig,
)

D = TrainConfig()


DATA_HELP = ("digits (bundled) | fashion-mnist[:DIR] (DIR, DIR/FashionMNIST/raw, else Debian's dataset-fashion-mnist "
             "in /usr/share/datasets/fashion-mnist) | cifar10:DIR (torchvision's cifar-10-batches-py) | "
             "imagefolder:PATH | synthetic[:CLASSES]")


ASYNC_MOMENTUM = 0.5


def add_parser(sub) -> None:
    """Define ``onetrick train``."""
    p = sub.add_parser("train", help="train a network (defaults: the small network on the bundled digits, one worker)")
    g = p.add_argument_group("what to train")
    g.add_argument("--model", default=D.model, help="smallnet | alexnet | alexnet2012 | torchvision:NAME (any torchvision classifier, untrained: "
                        "resnet18, resnet50, convnext_tiny, efficientnet_b0, mobilenet_v3_small, regnet_y_400mf, vgg16, ...)")
    g.add_argument("--data", default=D.data, help=DATA_HELP)
    g.add_argument("--train-examples", type=int, default=None, metavar="N",
                   help="train on a fixed class-stratified subset of N training examples (same for every seed); "
                        "the test set stays whole")
    g.add_argument("--download", action="store_true",
                   help="fashion-mnist:DIR / cifar10:DIR: let torchvision download the files into DIR (needs internet)")
    g.add_argument("--image-size", type=int, default=None, help="input side; default: the model's (32 or 224)")
    g.add_argument("--dropout", type=float, default=D.dropout, help="dropout rate before each hidden FC layer")
    g.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images (counted) instead of failing")
    g = p.add_argument_group("how long")
    g.add_argument("--classes", type=int, default=None, metavar="N",
                   help="classifier width (default: the data's classes; synthetic data draws labels from N classes, "
                        "e.g. --data synthetic --classes 1000000 for a huge classifier)")
    g.add_argument("--batch", type=int, default=D.batch, help="examples per worker per step (the paper's B)")
    g.add_argument("--steps", type=int, default=None, help="training steps (overrides --epochs)")
    g.add_argument("--epochs", type=float, default=D.epochs, help="passes over the training set (fractions allowed)")
    g = p.add_argument_group("recipe")
    g.add_argument("--lr", type=float, default=D.lr, help="weight learning rate at one worker; biases get --bias-lr-mult x")
    g.add_argument("--momentum", type=float, default=None,
                   help=f"default {D.momentum}; {ASYNC_MOMENTUM} for hogwild/paramserver, whose staleness already acts as "
                        "momentum (Mitliagkas et al. 2016): at 0.9 they stalled at chance in about half the runs")
    g.add_argument("--weight-decay", type=float, default=D.weight_decay, help="on weights only")
    g.add_argument("--bias-lr-mult", type=float, default=D.bias_lr_mult, help="biases learn this many times faster than weights")
    g.add_argument("--lr-mult", action="append", default=[], metavar="GLOB=MULT",
                   help="per-layer lr multiplier on parameter names, e.g. 'head.*=0.5' (repeatable)")
    g.add_argument("--schedule", choices=SCHEDULES, default=D.schedule, help="learning-rate schedule: " + " | ".join(SCHEDULES))
    g.add_argument("--lr-drops", type=fractions, default=D.lr_drops,
                   help="fractions of training where the step schedule multiplies lr by --lr-drop-factor")
    g.add_argument("--lr-drop-factor", type=float, default=D.lr_drop_factor, help="step schedule: lr multiplier at each drop; exp: at the end")
    g.add_argument("--lr-scale", choices=LR_SCALES, default=D.lr_scale, help="lr scaling for a K-times larger batch")
    g.add_argument("--warmup-epochs", type=float, default=D.warmup_epochs, metavar="E",
                   help="the scaled rate rises linearly from one worker's over the first E epochs (Goyal et al. 2017); "
                        "per parameter group, so a head kept at one worker's rate (--fc-batch worker) is not warmed")
    g.add_argument("--seed", type=int, default=D.seed, help="initial weights, data order, augmentation and dropout")
    g = p.add_argument_group("parallelism")
    g.add_argument("--workers", type=int, default=None,
                   help="K worker processes (or one per GPU); default 1, or under torchrun its processes (less --servers)")
    g.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="default: single for 1 worker, data otherwise; auto: the planner's choice (onetrick plan)")
    g.add_argument("--sync", choices=DATA_PARALLEL_SYNCS, default=D.sync, help="data parallelism: DDP or the paper's sharded update")
    g.add_argument("--scheme", choices=SCHEMES, default=None,
                   help="hybrid: how last-conv activations reach the FC layers (default auto: the cost model picks a, b or c)")
    g.add_argument("--cut", type=int, default=D.cut,
                   help="hybrid: the first N fully-connected layers run data-parallel with the trunk, the rest "
                        "model-parallel; 0 is the paper's cut before fc6")
    g.add_argument("--fc-batch", choices=FC_BATCHES, default=D.fc_batch, help="hybrid: FC updated once (K*B) or per round (B)")
    g.add_argument("--servers", type=int, default=D.servers, help="paramserver: server processes")
    g.add_argument("--fetch-every", type=int, default=D.fetch_every, help="paramserver: fetch weights every N steps")
    g.add_argument("--push-every", type=int, default=D.push_every, help="paramserver: push gradients every N steps")
    g.add_argument("--device", choices=DEVICES, default=D.device, help="cpu (gloo) or cuda (NCCL; worker i on GPU i)")
    g.add_argument("--precision", choices=PRECISIONS, default=D.precision,
                   help="bf16: autocast compute in bfloat16 (CUDA, and CPU); weights, optimizer state and the loss stay fp32")
    g.add_argument("--comm-dtype", choices=PRECISIONS, default=D.comm_dtype,
                   help="bf16: gradients, weights and activations cross the network in bfloat16 (half the bytes)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads per worker (default: cores / workers)")
    g.add_argument("--memory-per-worker", type=float, default=None, metavar="GB",
                   help="memory each worker may use; a run predicted to need more is refused before launch, and "
                        "--strategy auto picks only plans that fit (default: CPU: available memory / local workers, which "
                        "also caps a larger figure; CUDA: the GPU's memory)")
    g.add_argument("--timeout", dest="timeout_s", type=float, default=D.timeout_s, help="seconds before a stuck collective fails")
    g.add_argument("--max-restarts", type=int, default=D.max_restarts, help="restart the job this many times after a worker dies")
    g = p.add_argument_group("run directory")
    g.add_argument("--out", type=Path, default=None,
                   help="run directory: metrics.jsonl, summary.json, checkpoints/; default: a fresh runs/<date-time>, "
                        "linked as runs/latest. A directory holding another run is refused")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out (default runs/latest)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds a run: removes onetrick's files there, keeps any other")
    g.add_argument("--eval-every", type=int, default=D.eval_every, help="test error every N steps")
    g.add_argument("--eval-views", type=int, choices=(1, 10), default=D.eval_views, help="1: centre crop, 10: corners+centre, flipped")
    g.add_argument("--log-every", type=int, default=D.log_every, help="write a metrics.jsonl record every N steps")
    g.add_argument("--ckpt-every", type=int, default=D.ckpt_every, help="checkpoint every N steps (and at the end)")
    g.add_argument("--on-nan", choices=("stop", "skip"), default=D.on_nan,
                   help="a non-finite loss stops training (noticed at the next logging or checkpoint step, "
                        "so within --log-every steps; no checkpoint is written after it) or skips the "
                        "step on the device (weights and momentum kept)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write metrics.jsonl's scalars for TensorBoard in RUN/tensorboard/")
    g.add_argument("--debug", action="store_true",
                   help="print workers' full tracebacks (otherwise one line, and the traceback in RUN/error.log)")
    p.set_defaults(func=cmd_train)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values["workers"] = _workers(args)
    if values.get("strategy") is None:
        values["strategy"] = "single" if values["workers"] == 1 else "data"
    if args.momentum is None and values["strategy"] in ("hogwild", "paramserver"):
        values["momentum"] = ASYNC_MOMENTUM
    if values["strategy"] == "hybrid" and args.scheme is None:
        values["scheme"] = "auto"
    return TrainConfig(**values)


def _workers(args: argparse.Namespace) -> int:
    """--workers, checked against the processes torchrun started (their count includes
    the parameter servers)."""
    from onetrick.distributed.runtime import under_torchrun

    if not under_torchrun() or args.strategy == "hogwild":
        return D.workers if args.workers is None else args.workers
    servers = args.servers if args.strategy == "paramserver" else 0
    started = int(os.environ["WORLD_SIZE"])
    if args.workers is not None and args.workers + servers != started:
        raise ConfigError(f"--workers {args.workers}" + (f" + --servers {servers}" if servers else "")
                          + f" does not match the {started} processes torchrun started (WORLD_SIZE)")
    return started - servers


def cmd_train(args: argparse.Namespace) -> int:
    from onetrick.run.train import train

    def settled(out: Path) -> None:   # train() settles --out before any worker starts: the Ctrl-C line names it
        args.run_dir = out

    summary = train(config_from_args(args), on_run_dir=settled)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every process gets here; one line is enough
        return 0
    print(f"test top-1 error {summary['top1_error']:.2%} (accuracy {1 - summary['top1_error']:.2%}), "
          f"top-5 error {summary['top5_error']:.2%}, {summary['images_per_s']:.0f} images/s, "
          f"{summary['bytes_per_step_total'] / 1e6:.3f} MB sent per worker per step; run directory {args.run_dir}")
    return 0
