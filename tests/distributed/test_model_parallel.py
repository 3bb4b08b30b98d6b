"""Model parallelism beyond the equivalence suite: the class-sharded loss at 100,000
classes, the two-tower 2012 network, real AlexNet byte counts, failing workers."""
import time

import pytest
import torch
import torch.nn.functional as F

from onetrick.distributed.runtime import WorkerFailure, launch
from worker_functions import (
    NARROW,
    base_config,
    evaluation_of,
    hang_or_die,
    one_step_bytes,
    sharded_loss_and_grads,
    sharded_top_classes_of,
    tiny_model,
    two_tower_batches,
    two_tower_steps,
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("k", "classes"), [(2, 100_003), (4, 100_003), (4, 3)])
def test_sharded_cross_entropy_equals_dense_at_100k_classes(k, classes):
    n = 6   # 100,003 classes are uneven across K; 3 over 4 workers leaves worker 3 none
    results = launch(sharded_loss_and_grads, base_config(workers=k), classes, n, nprocs=k)
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(n, classes, generator=g) * 4).requires_grad_()
    targets = torch.randint(0, classes, (n,), generator=g)
    loss = F.cross_entropy(logits, targets)
    loss.backward()
    for got in results.values():
        start, end = got["range"]
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["grad"], logits.grad[:, start:end], rtol=1e-4, atol=1e-7)
        # one all-gather of 4 scalars per example and worker, never the (N, classes) logits
        assert got["bytes"]["fc_activations"] == (k - 1) / k * k * n * 4 * 4
        assert got["calls"] == {"fc_activations/all_gather": 1}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("k", "classes", "views"), [(2, 100_003, 1), (3, 100_003, 3), (4, 3, 2)])
def test_sharded_top5_equals_dense_without_assembling_the_logits(k, classes, views):
    """Evaluation's top-5 over a class-sharded head: the dense answer (by logit, or by the
    softmax averaged over views) on every worker, from K x 5 (score, class) pairs per example
    (and one log-sum-exp per row with views); 3 classes over 4 workers: one owns none."""
    n = 7
    results = launch(sharded_top_classes_of, base_config(workers=k), classes, n, views, nprocs=k)
    logits = torch.randn(n * views, classes, generator=torch.Generator().manual_seed(4)) * 4
    scores = logits.softmax(-1).view(n, views, -1).mean(1) if views > 1 else logits
    expected = scores.topk(min(5, classes), dim=1).indices
    for got in results.values():
        assert torch.equal(got["top"], expected)
        pairs = (k - 1) * n * 5 * 2 * 8                      # float64 (score, class) pairs from the others
        assert got["bytes"]["eval"] == pairs + ((k - 1) * n * views * 4 if views > 1 else 0)
        assert got["bytes"]["eval"] < n * classes * 4 or classes < 100   # far below the (N, classes) logits


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("k", "strategy", "views"), [(2, "hybrid", 10), (3, "model", 1)])
def test_sharded_evaluation_equals_a_dense_loop(k, strategy, views):
    """The test error of a class-sharded head (each worker its classes' logits, top-5
    merged) is what a plain loop over the dense model computes, image by image."""
    from onetrick.data import build_data

    classes = 12
    got = launch(evaluation_of, base_config(workers=k, strategy=strategy), classes, views, nprocs=k)
    model = tiny_model(NARROW, classes).eval()
    test = build_data(f"synthetic:{classes}", image_size=16).test(views=views)
    top1 = top5 = 0
    with torch.no_grad():
        for i in range(len(test)):
            image, label = test[i]
            scores = model(image if views > 1 else image[None]).softmax(-1).mean(0) if views > 1 else model(image[None])[0]
            best = scores.topk(5).indices.tolist()
            top1 += best[0] != label
            top5 += label not in best
    for result in got.values():
        assert result["test_examples"] == len(test)
        assert result["top1_error"] == pytest.approx(top1 / len(test), abs=1e-12)
        assert result["top5_error"] == pytest.approx(top5 / len(test), abs=1e-12)


@pytest.mark.timeout(300)
def test_two_tower_network_model_parallel_equals_one_process():
    from onetrick.models import build_model
    from onetrick.recipe import model_sgd

    steps, b = 2, 2
    cfg = base_config(strategy="model", workers=2, lr=0.01)
    results = launch(two_tower_steps, cfg, steps, b, nprocs=2)
    torch.manual_seed(0)
    model = build_model("alexnet2012", num_classes=10, dropout=0.0)
    opt = model_sgd(model, cfg, cfg.lr)
    for x, y in two_tower_batches(steps, b):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    want = model.state_dict()
    for rank, got in results.items():
        assert got["tower_parallel"], "each worker should run one tower"
        for name in want:
            torch.testing.assert_close(got["state"][name], want[name], rtol=1e-3, atol=5e-5,  # deep net: summation order
                                       msg=lambda m, r=rank, n=name: f"rank {r} {n}: {m}")
        # towers exchange conv2 outputs (128 ch x 13 x 13 each) and conv5 features (4,608 each)
        conv_exchange = 2 * 0.5 * b * (128 * 13 * 13 + 128 * 6 * 6) * 2 * 4
        assert got["bytes"][-1]["activations"] == conv_exchange


@pytest.mark.timeout(300)
def test_alexnet_hybrid_bytes_match_analytic_and_are_far_below_data_parallel():
    """One real step of the paper's AlexNet at K=2 (batch 2 per worker)."""
    k, b = 2, 2
    got = launch(one_step_bytes, base_config(workers=k, strategy="hybrid", scheme="b"), "alexnet", b, 224, nprocs=k)[0]
    conv, fc, feat, frac = 2_469_696, 58_631_144, 9216, (k - 1) / k
    assert got["weights"] == pytest.approx(2 * frac * (-(-conv // k) * k) * 4, abs=8)
    assert got["activations"] == pytest.approx(k * 2 * frac * b * feat * 4, abs=8)  # broadcast + reduce per round
    # per round: fc6 -> fc7 all-gather and reduce-scatter; fc7 -> fc8 is row-wise (1000 <= 4096
    # classes): one all-reduce of the (b, 1000) logits in place of another 4096-wide pair
    fc_internal = k * (2 * frac * k * b * (4096 // k) * 4 + 2 * frac * b * 1000 * 4)
    assert got["fc_activations"] == pytest.approx(fc_internal, abs=8)
    data_parallel = 2 * frac * (conv + fc) * 4
    assert sum(got.values()) < data_parallel / 20


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_dead_or_hung_worker_fails_the_job_with_a_message(mode):
    start = time.monotonic()
    with pytest.raises(WorkerFailure, match=r"^worker \d failed: "):
        launch(hang_or_die, base_config(workers=2, timeout_s=10), mode, nprocs=2)
    assert time.monotonic() - start < 90
