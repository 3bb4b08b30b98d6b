"""The ``onetrick`` command's registry of subcommands (no worker is started here)."""
from __future__ import annotations

import pytest

from onetrick.cli import COMMANDS, build_parser, cmd_train


def _subcommands(parser) -> dict:
    return next(a for a in parser._actions if a.dest == "command").choices


def test_every_registered_command_is_defined_in_order_with_its_function():
    parser = build_parser()
    assert list(_subcommands(parser)) == list(COMMANDS) == ["train", "eval", "export", "plot", "study", "bench",
                                                            "simulate", "plan"]
    assert parser.parse_args(["train"]).func is cmd_train
    assert parser.parse_args(["simulate", "--profile", "gtx-titan"]).func.__name__ == "cmd_simulate"
    assert parser.parse_args(["bench", "--workers", "1,2"]).workers == [1, 2]


def test_a_registry_entry_that_defines_another_command_is_refused(monkeypatch):
    monkeypatch.delitem(COMMANDS, "simulate")
    monkeypatch.setitem(COMMANDS, "plan", ".perf.simulate")   # defines "simulate", not "plan"
    with pytest.raises(RuntimeError, match="does not define the command 'plan'"):
        build_parser()


def test_unknown_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'nope'" in err
