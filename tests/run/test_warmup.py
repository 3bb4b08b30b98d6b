"""``--warmup-epochs``: the rate at chosen steps equals the closed form, per parameter
group (the hybrid's head at one worker's rate is not warmed), bad values refused before
launch, and a K=8 run that diverges without warm-up trains with it."""
from __future__ import annotations

import json

import pytest

from cli_helpers import onetrick
from onetrick.config import ConfigError, TrainConfig
from onetrick.distributed.runtime import launch

PER_EPOCH = 10  # steps


def closed_form(one_worker: float, k: int, step: int, warmup_epochs: float, total: int) -> float:
    """Linear from the one-worker rate to K times it over the warm-up, then the step
    schedule's drops (x0.1 at 50% and 75% of training)."""
    target = k * one_worker
    warm = min(1.0, step / (warmup_epochs * PER_EPOCH))
    drops = sum(step / total >= d for d in (0.5, 0.75))
    return (one_worker + (target - one_worker) * warm) * 0.1 ** drops


@pytest.mark.timeout(120)
def test_rates_follow_the_closed_form_and_the_per_round_head_is_not_warmed():
    from worker_functions import base_config, warmup_rates

    at = [0, 5, 10, 15, 20, 25, 31]
    runs = {"data": dict(strategy="data", sync="ddp"),
            "hybrid-worker": dict(strategy="hybrid", scheme="b", fc_batch="worker")}
    total = 4 * PER_EPOCH
    for label, changes in runs.items():
        cfg = base_config(workers=2, lr=0.01, lr_scale="linear", warmup_epochs=2.0, **changes)
        rates = launch(warmup_rates, cfg, PER_EPOCH, at, nprocs=2)[0]
        for step in at:
            for opt in rates[step]:
                for name, lr in opt:
                    one = 0.01 * (2.0 if name.endswith("bias") else 1.0)   # biases at 2x (--bias-lr-mult)
                    head_kept = label == "hybrid-worker" and name.startswith("head")
                    want = closed_form(one, 1 if head_kept else 2, step, 2.0, total)
                    assert lr == pytest.approx(want, rel=1e-12), f"{label} {name} step {step}"
    # the warm-up ends at step 20 and the first drop comes at step 20 too: 0.02 -> 0.002
    assert closed_form(0.01, 2, 10, 2.0, total) == pytest.approx(0.015)


@pytest.mark.parametrize("changes, message", [
    (dict(warmup_epochs=-1.0, lr_scale="linear"), "--warmup-epochs must be a number of epochs >= 0"),
    (dict(warmup_epochs=11.0, lr_scale="linear"), "--warmup-epochs 11 is longer than the run (--epochs 10)"),
    (dict(warmup_epochs=1.0), "--warmup-epochs needs --lr-scale linear or sqrt"),
])
def test_bad_warmup_refused_in_one_line(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        TrainConfig(**changes).validate()
    assert "\n" not in str(err.value)


@pytest.mark.timeout(60)
def test_warmup_longer_than_the_steps_refused_before_launch(tmp_path):
    result = onetrick("train", "--steps", "3", "--lr-scale", "linear", "--warmup-epochs", "1", "--out", tmp_path / "r",
                      timeout=50)
    assert result.returncode == 2
    assert result.stderr.strip() == "onetrick: error: --warmup-epochs 1 is 44 steps, longer than the run's 3"
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_k8_run_that_diverges_without_warmup_trains_with_it(tmp_path):
    """Fashion-MNIST (6,000 stratified training images), smallnet, K=8 data parallelism,
    B=16: the linearly scaled rate 8 x 0.01 from step 0 kills the network within ten steps
    (the loss sits at ln 10, test error at chance, as in the earlier study); warmed up over
    the first of 2 epochs it trains. About 2 x 2 minutes on 2 cores."""
    errors = {}
    for warmup in ("0", "1"):
        out = tmp_path / f"w{warmup}"
        result = onetrick("train", "--data", "fashion-mnist", "--train-examples", "6000", "--workers", "8",
                          "--strategy", "data", "--batch", "16", "--lr", "0.01", "--lr-scale", "linear",
                          "--warmup-epochs", warmup, "--epochs", "2", "--threads", "1", "--eval-every", "1000",
                          "--out", out, timeout=850)
        assert result.returncode == 0, result.stderr[-2000:]
        errors[warmup] = json.loads((out / "summary.json").read_text())["top1_error"]
    assert errors["0"] > 0.85, errors     # chance is 0.9
    assert errors["1"] < 0.4, errors
