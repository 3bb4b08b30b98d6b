"""A training step never waits for the device (issue #14): loss and errors stay device
tensors, summed on the device and read once per logging/checkpoint step; --on-nan skip
skips a bad step on the device, on every worker alike."""
import pytest
import torch

from cli_helpers import FAST, onetrick
from onetrick.distributed.runtime import launch
from worker_functions import base_config, global_batches, step_host_reads, tiny_model

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


@pytest.mark.gpu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("on_nan", ["stop", "skip"])
def test_a_cuda_step_makes_no_host_device_sync(on_nan):
    """CUDA's own sync detector: any synchronising call in a step raises."""
    from onetrick.distributed.runtime import Runtime
    from onetrick.distributed.strategy import SingleStrategy, StepStats

    rt = Runtime(rank=0, world=1, local_rank=0, device=torch.device("cuda"), mesh=None)
    strategy = SingleStrategy(tiny_model(), base_config(on_nan=on_nan, device="cuda"), rt)
    stats = StepStats(rt.device)
    batches = [(x.cuda(), y.cuda()) for x, y in global_batches(3, 1, B)]
    strategy.train_step(*batches[0])  # the first step allocates (momentum buffers): not measured
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, (x, y) in enumerate(batches[1:]):
            stats.add(strategy.train_step(x, y), step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.read()["nonfinite_steps"] == 0


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_hogwild_on_cuda_ends_cleanly(tmp_path):
    result = onetrick("train", "--strategy", "hogwild", "--workers", "2", "--device", "cuda", "--steps", "4",
                      "--batch", "16", "--out", tmp_path, *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Producer process has been terminated" not in result.stderr, result.stderr[-2000:]
