"""Every synchronous strategy equals a one-process reference (real processes, gloo).

One launch per worker count runs all strategies on the same batches; the references
are plain single-process PyTorch written in ``workers.py``.
"""
import pytest
import torch

from onetrick.distributed.runtime import launch
from workers import base_config, reference_rounds, reference_sgd, run_strategies

STEPS, B = 3, 8
EXACT_SGD = [dict(strategy="model"), dict(strategy="data", sync="ddp"), dict(strategy="data", sync="sharded"),
             dict(strategy="hybrid", scheme="a"), dict(strategy="hybrid", scheme="b"),
             dict(strategy="hybrid", scheme="c")]
PER_ROUND = [dict(strategy="hybrid", scheme="b", fc_batch="worker"),
             dict(strategy="hybrid", scheme="c", fc_batch="worker")]


def assert_same_weights(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=2e-5, msg=lambda m: f"{what}: {name}: {m}")


@pytest.fixture(scope="module", params=[2, 4], ids=lambda k: f"K={k}")
def runs(request):
    k = request.param
    results = launch(run_strategies, base_config(workers=k), EXACT_SGD + PER_ROUND, STEPS, B, nprocs=k)
    return k, results


@pytest.mark.timeout(240)
def test_synchronous_strategies_equal_one_worker_with_batch_kb(runs):
    k, results = runs
    want, want_losses = reference_sgd(base_config(), STEPS, k, B)
    for i, changes in enumerate(EXACT_SGD):
        for rank in results:
            assert_same_weights(results[rank][i]["state"], want, f"{changes} K={k} rank {rank}")
        assert results[0][i]["losses"] == pytest.approx(want_losses, rel=1e-4), changes


@pytest.mark.timeout(240)
def test_hybrid_fc_batch_worker_equals_sequential_rounds(runs):
    k, results = runs
    for j, changes in enumerate(PER_ROUND):
        want = reference_rounds(base_config(), changes["scheme"], STEPS, k, B)
        for rank in results:
            assert_same_weights(results[rank][len(EXACT_SGD) + j]["state"], want, f"{changes} K={k} rank {rank}")
