"""The command line: every parser, ``cmd_*`` and print of onetrick lives in this package,
and nothing else in onetrick imports argparse. :mod:`onetrick.cli.main` holds the
command table; each command is one module beside it."""
from onetrick.cli.main import run

__all__ = ["run"]
