"""``onetrick study``: its arguments and its command (the runs and the table are :mod:`onetrick.run.study`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from onetrick.cli.parsing import comma_choices, comma_ints, positive_ints
from onetrick.config import LR_SCALES, TrainConfig
from onetrick.run.description import check_model_and_data
from onetrick.run.study import VARIANTS, markdown, run_study


# -- CLI ------------------------------------------------------------------------------
def add_parser(sub) -> None:
    d = TrainConfig()
    p = sub.add_parser("study", help="the paper's table in shape: final test error of 1 vs K workers, data vs hybrid",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workers", type=positive_ints, default="1,2,4,8", help="worker counts K (1 is always run)")
    p.add_argument("--variants", type=comma_choices(VARIANTS, "variant"), default=",".join(VARIANTS),
                   help="data: synchronous data parallelism; hybrid-full: (K*B, K*B); hybrid-worker: (K*B, B)")
    p.add_argument("--seeds", type=comma_ints, default="0", help="one run per seed")
    p.add_argument("--model", default=d.model, help="as train --model")
    p.add_argument("--data", default=d.data, help="as train's --data, e.g. digits or fashion-mnist")
    p.add_argument("--train-examples", type=int, default=None, metavar="N",
                   help="every row trains on the same class-stratified subset of N examples; the test set stays whole")
    p.add_argument("--download", action="store_true", help="as train's --download")
    p.add_argument("--batch", type=int, default=16, help="B, examples per worker per step")
    p.add_argument("--epochs", type=float, default=d.epochs, help="the same epochs for every row")
    p.add_argument("--lr", type=float, default=d.lr, help="one worker's weight learning rate")
    p.add_argument("--lr-scale", choices=LR_SCALES, default="linear", help="conv lr for K workers (the paper's configs: linear)")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, metavar="E",
                   help="as train's: the scaled rate rises from one worker's over the first E epochs")
    p.add_argument("--scheme", choices=("a", "b", "c"), default="b",
                   help="hybrid scheme (hybrid-worker needs b or c)")
    p.add_argument("--eval-every", type=int, default=20, help="test error every N steps of one worker (every N/K steps at K workers: the same epochs)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per worker")
    p.add_argument("--device", default=d.device, help="cpu or cuda")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.md, OUT.json, OUT.png; run directories in OUT/runs")
    p.add_argument("--table-only", action="store_true",
                   help="train nothing: write the table from the rows that have finished, marking the others")
    p.set_defaults(func=cmd_study)


def cmd_study(args: argparse.Namespace) -> int:
    import shlex
    import sys

    base = TrainConfig(model=args.model, data=args.data, batch=args.batch, epochs=args.epochs, lr=args.lr,
                       lr_scale=args.lr_scale, warmup_epochs=args.warmup_epochs, threads=args.threads, device=args.device,
                       eval_every=args.eval_every, log_every=args.eval_every,
                       train_examples=args.train_examples, download=args.download)
    base.validate()
    check_model_and_data(base)   # --model and --data, before the first row trains
    command = "onetrick " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "--table-only")  # what trains it
    lines = run_study(base, args.workers, args.variants, args.seeds, args.out, command, args.scheme,
                      train_rows=not args.table_only)
    print(markdown(lines, base, command, args.scheme))
    return 0
