"""Every synchronous strategy equals a one-process reference (real processes, gloo).

One launch per worker count runs all strategies on the same batches; the references
are plain single-process PyTorch written in ``worker_functions.py``.
"""
import pytest

from onetrick.distributed.runtime import launch
from worker_functions import (
    CUT_K4,
    CUT_ROUNDS,
    CUT_SGD,
    EXACT_SGD,
    HIDDEN,
    PER_ROUND,
    assert_same_weights,
    base_config,
    reference_rounds,
    reference_sgd,
    run_strategies,
)

STEPS, B = 3, 8


@pytest.fixture(scope="module", params=[2, 4], ids=lambda k: f"K={k}")
def runs(request):
    k = request.param
    results = launch(run_strategies, base_config(workers=k), EXACT_SGD + PER_ROUND, STEPS, B, nprocs=k)
    return k, results


@pytest.mark.timeout(240)
def test_synchronous_strategies_equal_one_worker_with_batch_kb(runs):
    k, results = runs
    for i, changes in enumerate(EXACT_SGD):
        want, want_losses = reference_sgd(base_config(), STEPS, k, B, changes.get("hidden", HIDDEN))
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


@pytest.mark.timeout(300)
@pytest.mark.parametrize("k, cuts", [(2, CUT_SGD + CUT_ROUNDS), (4, CUT_K4)], ids=["K=2", "K=4"])
def test_hybrid_with_a_cut_equals_one_worker_and_the_sequential_rounds(k, cuts):
    """FC layers on the data-parallel side: --fc-batch full is SGD with batch K*B,
    --fc-batch worker the sequential rounds with those layers updated with the trunk."""
    results = launch(run_strategies, base_config(workers=k), cuts, STEPS, B, nprocs=k)
    for i, changes in enumerate(cuts):
        if changes.get("fc_batch") == "worker":
            want = reference_rounds(base_config(), changes["scheme"], STEPS, k, B, changes["cut"])
        else:
            want, want_losses = reference_sgd(base_config(), STEPS, k, B)
            assert results[0][i]["losses"] == pytest.approx(want_losses, rel=1e-4), changes
        for rank in results:
            assert_same_weights(results[rank][i]["state"], want, f"{changes} K={k} rank {rank}")
            assert results[rank][i]["calls"] == results[0][i]["calls"], f"{changes} K={k} rank {rank}"


# -- bytes: what each worker sends per step equals the analytic expectation ------------
def _padded(n: int, k: int) -> int:
    return -(-n // k) * k


def expected_bytes(changes: dict, k: int, b: int) -> dict[str, float]:
    """Bytes per worker per step (fp32) from the model's sizes alone (comm.py's table)."""
    from worker_functions import CLASSES, tiny_model

    hidden = changes.get("hidden", HIDDEN)
    model = tiny_model(hidden)
    conv = sum(p.numel() for p in model.trunk.parameters())
    total = sum(p.numel() for p in model.parameters())
    feat = model.head[0].in_features
    frac = (k - 1) / k

    def head(n: int) -> float:  # per FC forward+backward on n examples
        if CLASSES <= hidden[-1]:  # row-wise classifier: one all-reduce of the (n, classes) logits
            gathers = sum(2 * frac * k * n * -(-h // k) * 4 for h in hidden[:-1])
            return gathers + 2 * frac * n * CLASSES * 4
        gathers = sum(2 * frac * k * n * -(-h // k) * 4 for h in hidden)  # all-gather + reduce-scatter
        return gathers + frac * k * n * 4 * 4                              # 4 scalars per example and worker

    strategy, scheme = changes["strategy"], changes.get("scheme")
    if strategy == "data":
        n = total if changes["sync"] == "ddp" else _padded(total, k)
        return {"weights": 2 * frac * n * 4}
    if strategy == "model":
        return {"activations": 2 * frac * k * b * feat * 4, "fc_activations": head(k * b)}
    weights = 2 * frac * _padded(conv, k) * 4
    if scheme == "a":
        return {"weights": weights, "activations": 2 * frac * k * b * feat * 4, "fc_activations": head(k * b)}
    rounds = k * 2 * frac * b * feat * 4                                   # broadcast + reduce per round
    exchange = 2 * frac * b * feat * 4 if scheme == "c" else 0             # all-to-all there and back
    # broadcast per round, one reduce-scatter of all rounds' gradients: (K-1)/K * K*B*feat each way
    return {"weights": weights, "activations": rounds + exchange, "fc_activations": k * head(b)}


def test_bytes_per_step_match_the_analytic_expectation(runs):
    k, results = runs
    for i, changes in enumerate(EXACT_SGD + PER_ROUND):
        want = expected_bytes(changes, k, B)
        for step_bytes in results[0][i]["bytes"]:
            got = {tag: n for tag, n in step_bytes.items() if tag in want}
            assert got == pytest.approx(want, abs=16), f"{changes} K={k}"


# -- torchvision's networks (--model torchvision:NAME) ------------------------------------
@pytest.mark.timeout(300)
def test_torchvision_alexnet_strategies_equal_one_worker():
    """alexnet at 64x64 (its AdaptiveAvgPool makes the head the full 9216-4096-4096 one)."""
    from worker_functions import torchvision_reference, torchvision_steps

    runs = [dict(strategy="data", sync="ddp"), dict(strategy="model"), dict(strategy="hybrid", scheme="b")]
    cfg = base_config(workers=2, lr=0.01)
    results = launch(torchvision_steps, cfg, "alexnet", runs, 2, 2, 64, 13, nprocs=2)
    want = torchvision_reference(base_config(lr=0.01), "alexnet", 2, 2, 2, 64, 13)
    for i, changes in enumerate(runs):
        for rank in results:
            assert_same_weights(results[rank][i], want, f"alexnet {changes} rank {rank}")


@pytest.mark.slow   # the same classifier layout as torchvision's alexnet, tested above with every strategy
@pytest.mark.timeout(300)
def test_torchvision_vgg11_hybrid_step_equals_one_worker():
    """vgg11 (129M weights, 120M of them in the head) at the smallest image it takes, 32x32:
    one hybrid step at K=2 (about 45 s on 2 cores) against one process of batch 2B."""
    from worker_functions import torchvision_reference, torchvision_steps

    results = launch(torchvision_steps, base_config(workers=2, lr=0.01), "vgg11", [dict(strategy="hybrid", scheme="b")],
                     1, 2, 32, 13, nprocs=2)
    want = torchvision_reference(base_config(lr=0.01), "vgg11", 1, 2, 2, 32, 13)
    for rank in results:
        assert_same_weights(results[rank][0], want, f"vgg11 hybrid rank {rank}")


# -- collectives: each one a point where the workers meet; per step, exact ------------
def expected_calls(changes: dict, k: int) -> int:
    """Collectives per step: the head's per forward+backward (an all-gather and a
    reduce-scatter per hidden boundary, and either the row-wise classifier's all-reduce
    or the sharded loss's all-gather), plus per step what the strategy adds."""
    hidden = changes.get("hidden", HIDDEN)
    from worker_functions import CLASSES

    head = 2 * (len(hidden) - 1) + 1 if CLASSES <= hidden[-1] else 2 * len(hidden) + 1
    if changes["strategy"] == "model":
        return head + 1                                   # + the all-reduce of the input gradient
    trunk_and_labels = 2 + 1                              # reduce-scatter + all-gather (one bucket), labels
    if changes["scheme"] == "a":
        return head + 2 + trunk_and_labels                # + all-gather of rows, reduce-scatter back
    exchange = 2 if changes["scheme"] == "c" else 0      # all-to-all there and back
    return k * (head + 1) + 1 + exchange + trunk_and_labels   # per round: broadcast + head; one reduce-scatter


def test_collectives_per_step_are_what_each_round_needs(runs):
    """Scheme (b) with the 3-Linear head: 4 per round + 4 (today's 9 per round + 3 before)."""
    k, results = runs
    for i, changes in enumerate(EXACT_SGD + PER_ROUND):
        if changes["strategy"] == "data":
            continue
        for step_calls in results[0][i]["calls"]:
            assert sum(step_calls.values()) == expected_calls(changes, k), f"{changes} K={k}: {step_calls}"
        for rank in results:  # the same collectives everywhere (gloo would hang otherwise)
            assert results[rank][i]["calls"] == results[0][i]["calls"], f"{changes} K={k} rank {rank}"
    assert expected_calls(dict(strategy="hybrid", scheme="b"), 8) == 36   # 75 before (issue #18)
