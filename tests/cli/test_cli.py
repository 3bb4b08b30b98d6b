"""The ``onetrick`` command's registry of subcommands (no worker is started here)."""
from __future__ import annotations

import pytest

from onetrick.cli.main import COMMANDS, build_parser
from onetrick.cli.train import cmd_train


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
    monkeypatch.setitem(COMMANDS, "plan", "simulate")   # defines "simulate", not "plan"
    with pytest.raises(RuntimeError, match="does not define the command 'plan'"):
        build_parser()


def test_unknown_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'nope'" in err


def test_every_option_of_every_command_has_help_and_a_readable_default():
    import argparse

    for name, sub in _subcommands(build_parser()).items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"onetrick {name} {action.option_strings or action.dest}: no help text"
        text = sub.format_help()
        for bad in ("(default: None)", "(default: (", "(default: [", "(default: False)"):
            assert bad not in text, f"onetrick {name} --help shows {bad}"
    train_help = _subcommands(build_parser())["train"].format_help()
    assert "(default: 0.5,0.75)" in " ".join(train_help.split())


def test_version_and_no_command(capsys):
    from onetrick import __version__
    from onetrick.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"onetrick {__version__}"
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: onetrick") and all(name in out for name in COMMANDS)
