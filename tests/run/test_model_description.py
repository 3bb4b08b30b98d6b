"""The model is described once before launch (issue 32): one model build (on the meta
device) per ``onetrick train``, whatever the strategy, and one ``validate()``.

Each launch goes through the command line in this process and stops where the workers
would start (the synchronous launcher, and the hogwild and parameter-server entry points,
replaced by a stop). ``--strategy auto`` / ``--scheme auto`` may also build one real model,
to time its layers: counted apart.
"""
from __future__ import annotations

import pytest

from cli_helpers import FAST
from onetrick.config import TrainConfig
from onetrick.models import builds

SMALL = ["--model", "smallnet", "--data", "digits", "--batch", "8", "--steps", "2", *FAST]
RESNET = ["--model", "torchvision:resnet18", "--image-size", "32", "--data", "synthetic:10", "--batch", "4",
          "--steps", "2", *FAST]
K2 = ["--workers", "2"]

LAUNCHES = {
    "single": [*SMALL],
    "data": [*SMALL, *K2, "--strategy", "data"],
    "data sharded": [*SMALL, *K2, "--strategy", "data", "--sync", "sharded"],
    "model": [*SMALL, *K2, "--strategy", "model"],
    "hybrid b": [*SMALL, *K2, "--strategy", "hybrid", "--scheme", "b"],
    "hybrid cut 1": [*SMALL, *K2, "--strategy", "hybrid", "--scheme", "b", "--cut", "1"],
    "hogwild": [*SMALL, *K2, "--strategy", "hogwild"],
    "paramserver": [*SMALL, *K2, "--strategy", "paramserver"],
    "resnet18 single": [*RESNET],
    "resnet18 data": [*RESNET, *K2, "--strategy", "data"],
    "resnet18 hybrid b": [*RESNET, *K2, "--strategy", "hybrid", "--scheme", "b"],
}
PLANNED = {
    "strategy auto": [*SMALL, *K2, "--strategy", "auto"],
    "scheme auto": [*SMALL, *K2, "--strategy", "hybrid"],   # the hybrid's default scheme: auto
}


class Launched(Exception):
    """Raised where the workers would start: the count stops here."""


@pytest.fixture
def launch_stopped(monkeypatch) -> dict:
    """Stop every launch at the workers; count validate() calls; record what the
    synchronous launcher would have handed the workers."""
    import onetrick.run.hogwild
    import onetrick.run.paramserver
    import onetrick.run.train

    seen = {"validate": 0, "launch_args": None}
    validate = TrainConfig.validate

    def counted(self, *args, **kwargs):
        seen["validate"] += 1
        return validate(self, *args, **kwargs)

    def launch(fn, cfg, *args, **kwargs):
        seen["launch_args"] = args
        raise Launched(cfg.strategy)

    def asynchronous(cfg, source=None):
        raise Launched(cfg.strategy)

    monkeypatch.setattr(TrainConfig, "validate", counted)
    monkeypatch.setattr(onetrick.run.train, "launch", launch)
    monkeypatch.setattr(onetrick.run.hogwild, "train_hogwild", asynchronous)
    monkeypatch.setattr(onetrick.run.paramserver, "train_paramserver", asynchronous)
    # the planner's link probe starts K processes: a fixed link instead (it builds no model)
    monkeypatch.setattr("onetrick.run.auto.measured_link", lambda k, threads=1: {"measured_mbps": 1000.0,
                                                                                 "latency_us": 50.0})
    return seen


def _launch(args: list[str], out) -> dict[str, int]:
    """Run ``onetrick train ARGS`` up to its launch; the models built on the way, by kind."""
    from onetrick.cli import main as cli

    before = builds()
    with pytest.raises(Launched):
        cli.main(["train", *args, "--out", str(out)])
    after = builds()
    return {kind: after[kind] - before[kind] for kind in after}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(LAUNCHES))
def test_one_model_build_and_one_validate_before_launch(name, launch_stopped, tmp_path, capsys):
    built = _launch(LAUNCHES[name], tmp_path / "run")
    assert built == {"meta": 1, "real": 0}, built
    assert launch_stopped["validate"] == 1
    if "hogwild" not in name and "paramserver" not in name:   # summary.json's figure, computed before launch
        source, predicted = launch_stopped["launch_args"]
        assert source is None and predicted["total_bytes"] > 0 and predicted["parts"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(PLANNED))
def test_planned_launches_describe_once_and_time_at_most_one_real_model(name, launch_stopped, tmp_path, capsys):
    built = _launch(PLANNED[name], tmp_path / "run")
    assert built["meta"] == 1 and built["real"] <= 1, built
    assert launch_stopped["validate"] == 1   # the planner's choice is checked without a second validate()
    assert "plan: " in capsys.readouterr().out


def test_a_bad_model_or_cut_is_refused_from_the_one_description(launch_stopped, tmp_path, capsys):
    from onetrick.cli import main as cli

    for args, message in ((["--model", "nosuch"], "unknown model 'nosuch'"),
                          ([*K2, "--strategy", "hybrid", "--scheme", "b", "--cut", "3"],
                           "--cut 3 must be below the 3 fully-connected layers of smallnet")):
        before = builds()
        assert cli.main(["train", *SMALL, *args, "--out", str(tmp_path / "run")]) == 2
        assert message in capsys.readouterr().err
        assert builds()["real"] == before["real"] and builds()["meta"] - before["meta"] <= 1
