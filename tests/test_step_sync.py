"""A training step never waits for the device (issue #14): loss and errors stay device
tensors, summed on the device and read once per logging/checkpoint step; --on-nan skip
skips a bad step on the device, on every worker alike."""
import pytest
import torch

from onetrick.distributed.runtime import launch
from workers import base_config, step_host_reads

B = 4
RUNS = [dict(strategy="single"), dict(strategy="data", sync="ddp"), dict(strategy="data", sync="sharded"),
        dict(strategy="model"), dict(strategy="hybrid", scheme="a"), dict(strategy="hybrid", scheme="b"),
        dict(strategy="hybrid", scheme="c", fc_batch="worker")]


@pytest.fixture(scope="module")
def results():
    return launch(step_host_reads, base_config(workers=2), RUNS, B, nprocs=2)


@pytest.mark.timeout(240)
def test_steps_read_nothing_from_the_device_and_a_read_is_one(results):
    for rank, runs in results.items():
        for i, changes in enumerate(RUNS):
            assert runs[i]["step_reads"] == 0, f"{changes} rank {rank}: host reads in 3 steps"
            assert runs[i]["read_reads"] == 1, f"{changes} rank {rank}"


@pytest.mark.timeout(240)
def test_skip_leaves_the_weights_of_never_taking_the_bad_step(results):
    for rank, runs in results.items():
        for i, changes in enumerate(RUNS):
            seen, got, want = runs[i]["seen"], runs[i]["skipped"], runs[i]["clean"]
            assert seen["nonfinite_steps"] == 1 and seen["first_nonfinite_step"] == 1, changes
            assert seen["loss"] == seen["loss"], f"{changes}: the skipped step's NaN leaked into the sums"
            for name in want:
                assert torch.isfinite(got[name]).all(), f"{changes} rank {rank} {name}"
                torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, n=name: f"{changes} rank {rank} {n}: {m}")
