"""onetrick: train convolutional networks in parallel (data, model, hybrid, asynchronous); run, inspect and benchmark them."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from onetrick.cli.parsing import OneLineParser
from onetrick.config import (
    ConfigError,
)
from onetrick.version import __version__

#: Every subcommand, in ``onetrick --help`` order: its name -> ``"module[:function]"``
#: (a module of this package; the function defaults to ``add_parser``), which is called
#: with argparse's subparsers, defines that command and sets its ``func``. Adding a
#: command is one line here and one module beside this one.
COMMANDS: dict[str, str] = {
    "train": "train",
    "eval": "results:add_eval_parser",
    "export": "results:add_export_parser",
    "plot": "results:add_plot_parser",
    "study": "study",
    "bench": "bench",
    "simulate": "simulate",
    "plan": "plan",
}


def _definer(spec: str):
    """The function a :data:`COMMANDS` entry names."""
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(f"onetrick.cli.{module}"), function or "add_parser")


def build_parser() -> argparse.ArgumentParser:
    """The ``onetrick`` parser with every command of :data:`COMMANDS`."""
    parser = OneLineParser(prog="onetrick", description=__doc__)
    parser.add_argument("--version", action="version", version=f"onetrick {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for name, spec in COMMANDS.items():
        _definer(spec)(sub)
        if name not in sub.choices:
            raise RuntimeError(f"{spec} does not define the command {name!r}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `onetrick` alone: what it can do
        parser.print_help()
        return 0
    from torch.distributed.checkpoint.api import CheckpointException

    from onetrick.data import DataError
    from onetrick.distributed.runtime import WorkerFailure
    from onetrick.run.checkpoint import CheckpointError
    from onetrick.run.records import NonFiniteLoss

    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, WorkerFailure, NonFiniteLoss) as err:
        print(f"onetrick: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path the user gave that cannot be read or written
        where = f": {err.filename}" if err.filename else ""
        print(f"onetrick: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"onetrick: {_interrupted(getattr(args, 'run_dir', None))}", file=sys.stderr)
        return 130
    except CheckpointException as err:   # DCP's wrapper (a BaseException) of a save that failed: a full disk
        print(f"onetrick: error: {_unwritten(err, getattr(args, 'run_dir', None))}", file=sys.stderr)
        return 2


def _interrupted(run_dir: Path | None) -> str:
    """Ctrl-C's line: how to resume, only where there is something to resume."""
    from onetrick.run.checkpoint import candidates

    if run_dir is None:
        return "interrupted"
    if candidates(run_dir):
        return f"interrupted; resume with --resume --out {run_dir}"
    return f"interrupted before the first checkpoint: nothing to resume in {run_dir}"


def _unwritten(err: BaseException, run_dir: Path | None) -> str:
    """A checkpoint that could not be written: the first worker's error (torch's writer
    drops a full disk's reason: "unexpected pos"), and the newest one left to resume from."""
    from onetrick.run.checkpoint import candidates, first_line

    left = candidates(run_dir) if run_dir is not None else []
    resume = f"; {left[0].name} is the newest left: resume with --resume --out {run_dir}" if left else ""
    return f"a checkpoint could not be written ({first_line(err)}; is the disk full?){resume}"


def run() -> None:
    """The ``onetrick`` program (and ``python -m onetrick.cli``): :func:`main`, then exit.

    A worker that torchrun started leaves without the interpreter's finalization: gloo's
    threads may still be dropping the last collective's tensors then, and a thread that
    takes the GIL while Python finalizes aborts the process (SIGABRT after a run that
    succeeded, about 1 run in 10 on a loaded machine; torch's open bug, pytorch#190489).
    Everything the run writes is on disk by then; the console streams are flushed here."""
    from onetrick.distributed.runtime import under_torchrun

    code = main()
    if under_torchrun():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
