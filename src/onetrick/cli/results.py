"""``onetrick eval``, ``export`` and ``plot``: reading a finished run back."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from onetrick.config import ConfigError


def warn(line: str) -> None:
    """One line on stderr: something the user should know, which did not stop the command."""
    print(f"onetrick: warning: {line}", file=sys.stderr, flush=True)


def cmd_eval(args: argparse.Namespace) -> int:
    """JSON with the test errors and the ``step`` scored; a newer checkpoint that could
    not be read is named on stderr."""
    from onetrick.run.export import evaluate_run

    result = evaluate_run(args.run, views=args.views, data=args.data, on_skip=warn)
    print(json.dumps(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from onetrick.run.export import export_run

    path = export_run(args.run, args.output, on_skip=warn)
    print(f"wrote {path}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Curves (and filters) of ``args.runs``; damaged metrics are one line, no plot drawn."""
    from onetrick.run.export import first_layer_weight
    from onetrick.run.plots import MetricsError, plot_curves, plot_filters

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"-o {out} is a file; plot writes PNG files into a folder")
    out.mkdir(parents=True, exist_ok=True)
    try:
        written = [plot_curves([Path(r) for r in args.runs], out / "curves.png")]
    except MetricsError as err:
        raise ConfigError(str(err)) from None
    if not args.no_filters:
        written.append(plot_filters(first_layer_weight(Path(args.runs[0])), out / "filters.png"))
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


def add_eval_parser(sub) -> None:
    """Define ``onetrick eval``."""
    p = sub.add_parser("eval", help="test error of a run's newest readable checkpoint (JSON, with the step scored)")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--views", type=int, choices=(1, 10), default=1, help="1: centre crop, 10: corners+centre, flipped")
    p.add_argument("--data", default=None, help="data spec (default: the run's)")
    p.set_defaults(func=cmd_eval)


def add_export_parser(sub) -> None:
    """Define ``onetrick export``."""
    p = sub.add_parser("export", help="write a run's newest checkpoint as one file: weights, model name, classes, input (onetrick.load reads it)")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("-o", "--output", type=Path, default=None, help="default: RUN/model.pt")
    p.set_defaults(func=cmd_export)


def add_plot_parser(sub) -> None:
    """Define ``onetrick plot``."""
    p = sub.add_parser("plot", help="error curves of runs and first-layer filters (PNG)")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("-o", "--output", default="plots", help="output folder")
    p.add_argument("--no-filters", action="store_true", help="curves only, no first-layer filter image")
    p.set_defaults(func=cmd_plot)
