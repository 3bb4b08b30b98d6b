"""The planner (``onetrick plan``, ``train --strategy auto``, ``--scheme auto``, ``--cut``):
the paper's rule applied by the cost model, one-line errors, and the plan recorded."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cli_helpers import FAST, onetrick
from onetrick.config import ConfigError, TrainConfig
from onetrick.models import TrunkHeadNet, build_model, fc_head
from onetrick.perf.planner import candidate_variants, make_plan
from onetrick.perf.predict.blocks import describe, model_blocks
from onetrick.perf.predict.compute import FlopCosts, ZeroCosts
from onetrick.perf.predict.hardware import PROFILES
from onetrick.perf.predict.step import Link, Variant, predict
from worker_functions import CUT_ROUNDS, CUT_SGD, EXACT_SGD, PER_ROUND

TITAN = PROFILES["gtx-titan"]
LINKS = [Link(gbps=48, latency_us=10), Link(gbps=3.2, collective_us=300)]


def flop_costs(blocks):
    return FlopCosts(blocks, TITAN["peak_flops"], TITAN["efficiency"], TITAN["mem_gbs"])


def net(hidden: tuple[int, ...], classes: int, channels: int = 64) -> TrunkHeadNet:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(64, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    return TrunkHeadNet(trunk, fc_head(channels * 8 * 8, hidden, classes, 0.5))


@pytest.mark.parametrize("link", LINKS, ids=["fast", "slow"])
def test_100000_classes_get_the_classifier_only_cut(link):
    """Narrow hidden FC layers, a 100,000-class classifier: synchronising the hidden
    layers' small weights beats sharding them, sharding the classifier beats everything."""
    blocks = describe(net((256, 256), 100_000), 32)
    plan = make_plan(blocks, flop_costs(blocks), 8, 128, link)
    assert plan.choice.variant.strategy == "hybrid"
    assert plan.choice.variant.cut == 2          # all but the last Linear: the classifier alone is model-parallel
    assert plan.choice.runnable and "runnable" not in plan.reason
    assert make_plan(blocks, flop_costs(blocks), 8, 128, link, runnable_only=True).choice.variant == plan.choice.variant
    v = plan.choice.variant                      # what --strategy auto would train: accepted
    TrainConfig(workers=8, strategy=v.strategy, scheme=v.scheme, cut=v.cut, model="smallnet").validate()
    data = next(c for c in plan.candidates if c.variant.strategy == "data")
    assert data.result.bytes["weights"] > 20 * plan.choice.result.bytes["weights"]


@pytest.mark.parametrize("link", LINKS, ids=["fast", "slow"])
def test_a_negligible_head_gets_data_parallelism(link):
    """A 16-feature trunk and a 10-class classifier (170 weights): nothing worth sharding."""
    blocks = describe(net((), 10, channels=1), 32)
    plan = make_plan(blocks, flop_costs(blocks), 4, 32, link)
    assert plan.choice.variant.strategy == "data", plan.reason
    assert plan.reason.startswith("data/") and "\n" not in plan.reason


def test_cut_moves_the_dp_side_and_the_crossing_activations():
    """A cut's FC weights are synchronised with the trunk's; what crosses is the cut layer's output."""
    blocks = model_blocks("smallnet", 10, 32)
    k, b = 2, 8
    cut0 = predict(blocks, ZeroCosts(), Variant("hybrid", None, "a"), k, b).bytes
    cut1 = predict(blocks, ZeroCosts(), Variant("hybrid", None, "a", "full", 1), k, b).bytes
    fc6 = 1024 * 2048 + 2048
    assert cut1["weights"] - cut0["weights"] == pytest.approx(fc6 * 4, rel=1e-3)       # (K-1)/K x 2 passes
    assert cut1["activations"] == cut0["activations"] * 2048 // 1024                  # 2048-wide, not 1024
    with pytest.raises(ValueError, match="cut 3 is outside 0..2"):
        predict(blocks, ZeroCosts(), Variant("hybrid", None, "b", "full", 3), k, b)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("fc_batch", ["full", "worker"])
def test_every_runnable_plan_is_one_the_equivalence_tests_prove(k, fc_batch):
    blocks = model_blocks("smallnet", 10, 32)
    proven = {tuple(sorted(d.items())) for d in EXACT_SGD + PER_ROUND + CUT_SGD + CUT_ROUNDS}
    for v, batch in candidate_variants(blocks, k, 8, fc_batch):
        run = {"strategy": v.strategy, **({"sync": v.sync} if v.sync else {}), **({"scheme": v.scheme} if v.scheme else {}),
               **({"fc_batch": v.fc_batch} if v.fc_batch != "full" else {}), **({"cut": v.cut} if v.cut else {})}
        assert tuple(sorted(run.items())) in proven, v
        assert batch == (k * 8 if v.strategy == "model" else 8)   # model parallelism at the same K*B examples


def test_cut_options_are_checked_in_one_line():
    from onetrick.run.description import describe as describe_run
    from onetrick.run.preflight import check_cut

    def check(cfg: TrainConfig) -> None:   # the options, then the range against the model's head
        check_cut(cfg.validate(), describe_run(cfg))

    check(TrainConfig(strategy="hybrid", workers=2, cut=0))
    check(TrainConfig(strategy="hybrid", workers=2, cut=2))   # the classifier alone model-parallel: runs
    for cfg, msg in [(dict(strategy="hybrid", cut=3), "--cut 3 must be below the 3 fully-connected layers"),
                     (dict(strategy="hybrid", cut=-1), "--cut must be at least 0"),
                     (dict(strategy="data", cut=1), "--cut 1 needs --strategy hybrid")]:
        with pytest.raises(ConfigError, match=msg):
            check(TrainConfig(workers=2, **cfg))


@pytest.mark.timeout(120)
def test_plan_json_schema_and_table():
    args = ["plan", "--model", "smallnet", "--workers", "4", "--batch", "16", "--profile", "gtx-titan",
            "--link-mbps", "1000", "--collective-us", "100"]
    r = onetrick(*args, "--json", timeout=100)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["workers"] == 4 and out["batch"] == 16 and out["link"]["gbps"] == 1.0
    assert set(out["choice"]) >= {"label", "strategy", "sync", "scheme", "fc_batch", "cut", "batch", "predicted_step_ms",
                                  "speedup", "bytes", "bytes_total", "exposed_ms", "runnable"}
    labels = [c["label"] for c in out["candidates"]]
    assert {"data/ddp", "data/sharded", "model", "hybrid/a", "hybrid/b", "hybrid/c", "hybrid/b/cut2"} <= set(labels)
    steps = [c["predicted_step_ms"] for c in out["candidates"]]
    assert steps == sorted(steps) and out["choice"]["label"] == labels[0]
    assert out["reason"].startswith(labels[0] + ":")
    table = onetrick(*args, timeout=100)
    assert table.returncode == 0 and "| plan | batch | step ms |" in table.stdout
    assert f"choice: {out['choice']['label']}: " in table.stdout   # the probes' terms are measured anew per run


@pytest.mark.parametrize("args, msg", [
    (["plan", "--model", "vgg"], "unknown model 'vgg'"),
    (["plan", "--link-mbps", "fast"], "--link-mbps expects a number or 'measured'"),
    (["plan", "--workers", "0"], "--workers and --batch must be at least 1"),
    (["train", "--workers", "2", "--strategy", "hybrid", "--cut", "7"], "--cut 7 must be below the 3"),
])
def test_bad_plan_and_cut_input_is_one_line(args, msg):
    r = onetrick(*args, timeout=60)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.timeout(300)
def test_strategy_auto_trains_and_records_plan_prediction_and_measured_step(tmp_path):
    run = tmp_path / "run"
    r = onetrick("train", "--workers", "2", "--strategy", "auto", "--steps", "4", "--out", run, *FAST, timeout=280)
    assert r.returncode == 0, r.stderr
    plan_line = [ln for ln in r.stdout.splitlines() if ln.startswith("plan: ")]
    assert len(plan_line) == 1
    summary = json.loads((run / "summary.json").read_text())
    plan = summary["plan"]
    choice = plan["choice"]
    assert plan_line[0].startswith(f"plan: {choice['label']}:") and choice["runnable"]
    assert summary["config"]["strategy"] == choice["strategy"] != "auto"
    assert summary["config"]["batch"] == choice["batch"]
    assert len(plan["candidates"]) >= 6 and all(c["predicted_step_ms"] > 0 for c in plan["candidates"])
    assert plan["measured_step_ms"] > 0 and plan["link"]["gbps"] > 0 and plan["link_probe"]["kind"].startswith("loopback")
    assert summary["steps"] == 4


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "densenet121"])
def test_an_opaque_trunk_splits_into_blocks_in_the_order_backward_frees_them(name):
    """A torchvision trunk (its own forward) becomes one block per unit its forward runs,
    every parameter in exactly one, the last block's output the trunk's own (after its
    functional pooling); and autograd finishes the blocks' gradients in reverse block
    order, which is what the simulator assumes when it sends a bucket once its blocks'
    backward is done (a one-block trunk sent every trunk gradient after the whole backward)."""
    torch.manual_seed(0)
    net = build_model(f"torchvision:{name}", 10, 3)
    blocks = describe(net, 32)
    trunk = [b for b in blocks if b.part == "trunk"]
    assert len(trunk) > 8
    names = [n for b in trunk for n, _ in b.params]
    assert names == [f"trunk.{n}" for n, _ in net.trunk.named_parameters()]   # each once, registration order
    with torch.no_grad():
        assert trunk[-1].out_shape == tuple(net.trunk.eval()(torch.zeros(1, 3, 32, 32)).shape[1:])
    block_of = {n: i for i, b in enumerate(trunk) for n, _ in b.params}
    finished: list[int] = []
    for n, p in net.trunk.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, n=n: finished.append(block_of[f"trunk.{n}"]))
    net.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    assert len(finished) == len(names) and finished == sorted(finished, reverse=True)


def test_a_trunk_with_parameters_outside_its_units_stays_one_block():
    """ViT's class token is a parameter of the model itself: no exact split, one block."""
    torch.manual_seed(0)
    blocks = describe(build_model("torchvision:vit_b_16", 10, 3), 224)
    assert [b.name for b in blocks if b.part == "trunk"] == ["trunk"]


def test_large_tensors_move_at_the_large_op_factor():
    """A collective on a tensor over the 32 MiB mmap threshold takes the probe's
    large-tensor factor; one under it the bucket-size factor."""
    from onetrick.perf.predict.step import collective_s

    link = Link(gbps=8.0, op_factor={"all_gather": 1.0}, large_op_factor={"all_gather": 0.25})
    small, large = collective_s(link, 2, "all_gather", 16 * 2**20), collective_s(link, 2, "all_gather", 64 * 2**20)
    assert small == pytest.approx(8 * 2**20 / 1e9)
    assert large == pytest.approx(4 * small * 4)
    assert collective_s(link.idle(), 2, "all_gather", 64 * 2**20) == pytest.approx(4 * small)
