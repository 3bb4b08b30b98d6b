"""``onetrick bench`` and ``onetrick simulate``: end to end on tiny configurations, the
simulator's byte formulas against the bytes the strategies really send, and the shaped
link in network namespaces (where this machine allows it)."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from onetrick.config import TrainConfig
from onetrick.distributed import parallelize
from onetrick.distributed.runtime import launch
from onetrick.models import TrunkHeadNet, fc_head
from onetrick.perf.bench.jobs import expand_jobs
from onetrick.perf.bench.netns import NetnsError, ShapedNetwork, netns_available
from onetrick.perf.bench.report import COLUMNS
from onetrick.perf.bench.runner import resolve_link
from onetrick.perf.predict.blocks import describe, model_blocks
from onetrick.perf.predict.compute import FlopCosts, ZeroCosts
from onetrick.perf.predict.step import STRATEGY_VARIANTS, Link, Variant, predict, step_bytes

B, IMAGE = 8, 16
VARIANTS = [v for v in STRATEGY_VARIANTS if v.strategy != "single"]
# the hybrid with FC layers on the data-parallel side: cut 1 (fc7 + a row-wise classifier
# model-parallel) and cut 2 (the classifier alone, split by classes)
CUT_VARIANTS = [Variant("hybrid", None, "a", "full", 1), Variant("hybrid", None, "b", "full", 2),
                Variant("hybrid", None, "c", "full", 1), Variant("hybrid", None, "b", "worker", 1),
                Variant("hybrid", None, "c", "worker", 2)]


def tiny() -> TrunkHeadNet:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    return TrunkHeadNet(trunk, fc_head(8 * 4 * 4, (50, 30), 10, dropout=0.0))


def measured_bytes(rt, cfg, variants: list[Variant]) -> list[tuple[dict, dict]]:
    """One step of each variant on the tiny model; the bytes (by tag) and the collectives
    (by op) this worker's Comm counted."""
    out = []
    for v in variants:
        changes = {"strategy": v.strategy, "sync": v.sync or "ddp", "scheme": v.scheme, "fc_batch": v.fc_batch,
                   "cut": v.cut}
        strategy = parallelize(tiny(), cfg.replace(**changes), rt)
        g = torch.Generator().manual_seed(rt.rank)
        strategy.comm.take()
        strategy.train_step(torch.randn(B, 3, IMAGE, IMAGE, generator=g), torch.randint(0, 10, (B,), generator=g))
        ops: dict[str, int] = {}
        for call, n in strategy.comm.calls.items():
            ops[call.split("/")[-1]] = ops.get(call.split("/")[-1], 0) + n
        out.append((strategy.comm.take()["bytes"], ops))
    return out


def run_cli(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "onetrick.cli", *args], capture_output=True, text=True, check=False,
                          timeout=timeout, env=env)


@pytest.mark.timeout(120)
def test_simulated_bytes_and_collectives_equal_what_the_strategies_send():
    k = 2
    cfg = TrainConfig(workers=k, threads=1, timeout_s=60, dropout=0.0)
    got = launch(measured_bytes, cfg, VARIANTS + CUT_VARIANTS, nprocs=k)
    blocks = describe(tiny(), IMAGE)
    for variant, res0, res1 in zip(VARIANTS + CUT_VARIANTS, got[0], got[1]):
        want = predict(blocks, ZeroCosts(), variant, k, B)
        assert want.bytes == step_bytes(blocks, variant, k, B)
        for rank, (sent, ops) in enumerate((res0, res1)):
            sent = {t: n for t, n in sent.items() if n}
            assert sent == want.bytes, f"{variant.label} rank {rank}"
            assert ops == want.collectives, f"{variant.label} rank {rank}"


@pytest.mark.timeout(150)
def test_bench_end_to_end_writes_the_table(tmp_path):
    out = tmp_path / "tiny"
    res = run_cli("bench", "--model", "smallnet", "--workers", "1,2", "--batch", "4", "--steps", "2", "--warmup", "1",
                  "--strategies", "single,hybrid", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    header = "| " + " | ".join(COLUMNS) + " |"
    assert header in res.stdout
    md = (tmp_path / "tiny.md").read_text()
    assert header in md and "torch loop (plain PyTorch)" in md and "Framework tax" in md
    assert (tmp_path / "tiny.png").stat().st_size > 0
    result = json.loads((tmp_path / "tiny.json").read_text())
    rows = {r["label"]: r for r in result["rows"]}
    assert set(rows) == {"single", "hybrid/b"}
    assert rows["single"]["speedup"] == 1.0 and rows["single"]["bytes_total"] == 0
    hyb = rows["hybrid/b"]
    assert hyb["workers"] == 2 and hyb["batches"] == "(8, 8)" and hyb["step_ms"] > 0
    assert hyb["speedup"] == pytest.approx(hyb["images_per_s"] / rows["single"]["images_per_s"])
    assert hyb["bytes_weights"] > 0 and hyb["bytes_activations"] > 0 and hyb["comm_est_ms"] > 0
    assert 0.0 <= hyb["hidden"] <= 1.0
    assert result["link"]["measured_mbps"] > 0 and result["baseline"]["torch_loop_step_ms"] > 0
    # the simulator's bytes for the same configuration are the bytes the bench measured
    want = step_bytes(model_blocks("smallnet", 1000, 32), Variant("hybrid", scheme="b"), 2, 4)
    assert {t: int(n) for t, n in hyb["bytes"].items()} == want
    # collectives per step: what the Comm counted, by tag/op, and what the cost model predicts
    predicted = predict(model_blocks("smallnet", 1000, 32), ZeroCosts(), Variant("hybrid", scheme="b"), 2, 4)
    assert hyb["collectives_per_step"] == sum(hyb["collectives"].values()) == sum(predicted.collectives.values())
    assert rows["single"]["collectives_per_step"] == 0 and rows["single"]["collectives"] == {}


@pytest.mark.timeout(420)   # about 60 s alone here; over 190 s beside the rest of the suite in CI
def test_validate_plan_runs_every_candidate_and_compares_the_pick_with_the_best(tmp_path):
    """``bench --validate-plan``: every candidate at K=2 (model parallelism at K*B examples),
    the ``single`` and ``independent`` rows it takes the machine's speed and the workers'
    contention from, the pick against the best measured."""
    out = tmp_path / "plan"
    res = run_cli("bench", "--model", "smallnet", "--workers", "1,2", "--batch", "4", "--steps", "2", "--warmup", "1",
                  "--no-baseline", "--validate-plan", "--out", str(out), timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "plan.json").read_text())
    rows = {r["label"]: r for r in result["rows"]}
    assert {"data/ddp", "data/sharded", "model", "hybrid/a", "hybrid/b", "hybrid/c", "independent (no comm)"} <= set(rows)
    assert rows["model"]["batch"] == 8 and rows["data/ddp"]["batch"] == 4   # every candidate: one step on K*B examples
    (k2,) = result["validate_plan"]["per_k"]
    # per step, K workers lose the independent row's step less the time-shared single steps
    assert k2["contention_ms"] == pytest.approx(rows["independent (no comm)"]["step_ms"]
                                                - k2["share"] * rows["single"]["step_ms"])
    assert k2["drift"] > 0 and k2["slow"] == pytest.approx(k2["drift"] * k2["share"])
    assert {r["label"] for r in k2["rows"]} == set(rows) - {"single", "independent (no comm)"}
    measured = {r["label"]: r["step_ms"] for r in result["rows"] if r["workers"] == 2 and r["strategy"] != "independent"}
    assert k2["best_measured_ms"] == min(measured.values())
    assert k2["gap"] == pytest.approx(measured[k2["pick"]] / k2["best_measured_ms"] - 1)
    assert "### Planner validation" in (tmp_path / "plan.md").read_text()


@pytest.mark.slow   # minutes of the default suite; what it checks is covered by a faster test
@pytest.mark.timeout(200)
def test_bench_bf16_rows_halve_the_bytes_on_the_wire(tmp_path):
    out = tmp_path / "bf16"
    res = run_cli("bench", "--model", "smallnet", "--workers", "1,2", "--batch", "4", "--steps", "1", "--warmup", "1",
                  "--strategies", "single,data", "--precision", "bf16", "--comm-dtype", "fp32,bf16",
                  "--out", str(out), timeout=190)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["label"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert set(rows) == {"single/bf16", "data/ddp/bf16", "data/ddp/bf16/bf16-wire"}
    fp32, bf16 = rows["data/ddp/bf16"]["bytes"], rows["data/ddp/bf16/bf16-wire"]["bytes"]
    assert bf16["weights"] == fp32["weights"] / 2 and bf16["metrics"] == fp32["metrics"]
    assert rows["single/bf16"]["precision"] == "bf16" and rows["single/bf16"]["baseline"]["torch_loop_step_ms"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| torch loop (plain PyTorch)/bf16 | 1 |" in md and "Framework tax (one worker) (bf16)" in md


@pytest.mark.timeout(60)
def test_simulate_paper_profile_and_bytes_targets(tmp_path):
    res = run_cli("simulate", "--model", "alexnet", "--profile", "gtx-titan", "--workers", "1,2,4,8", "--batch", "128",
                  "--out", str(tmp_path / "sim"), timeout=50)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Against the paper's measured speedups" in res.stdout and "| 8 | 6.25x |" in res.stdout
    rows = json.loads((tmp_path / "sim.json").read_text())["rows"]
    by = {(r["label"], r["workers"]): r for r in rows}
    for k in (2, 4, 8):
        hyb, data = by[("hybrid/b", k)], by[("data/ddp", k)]
        # conv weights + last-conv activations: under 1/5 of data parallelism's bytes; the
        # exchanges inside the neuron-sharded FC head ("fc_activations") come on top
        assert hyb["bytes"]["weights"] + hyb["bytes"]["activations"] <= data["bytes_total"] / 5
        assert hyb["bytes_total"] < data["bytes_total"] / 2
        assert 1.0 < hyb["speedup"] <= k
    # docs/PAPER.md: 128 x 9,216 x 4 B = 4.7 MB of last-conv activations per worker
    assert by[("hybrid/b", 2)]["bytes"]["activations"] == 2 * 128 * 9216 * 4


def test_expand_jobs_and_link_choice():
    jobs = expand_jobs(["single", "data", "hybrid"], [1, 2], ["ddp"], ["a", "b"], ["full", "worker"])
    assert [j.label for j in jobs] == ["single", "data/ddp", "hybrid/a", "hybrid/b", "hybrid/b/fc-B"]
    mbps, note = resolve_link("paper", 50.0)
    assert mbps == pytest.approx(50e9 / (1e12 / 6e9) * 8 / 1e6, abs=1) and "paper" in note
    assert resolve_link(None, 50.0)[0] is None


def test_shaped_link_without_root_fails_with_one_line(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NetnsError, match="needs root"):
        ShapedNetwork(2, 100).create()


def _our_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith("onetrick-")]


@pytest.mark.slow   # minutes of the default suite; what it checks is covered by a faster test
@pytest.mark.timeout(120)
@pytest.mark.skipif(netns_available() is not None, reason=f"shaped link unavailable here: {netns_available()}")
def test_bench_over_a_shaped_link_in_network_namespaces(tmp_path):
    before = set(_our_namespaces())
    res = run_cli("bench", "--model", "smallnet", "--workers", "2", "--batch", "4", "--steps", "1", "--warmup", "1",
                  "--strategies", "data", "--link-mbps", "200", "--out", str(tmp_path / "shaped"), timeout=110)
    if res.returncode != 0 and "ip netns add" in res.stderr:
        pytest.skip(res.stderr.strip().splitlines()[-1])
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "shaped.json").read_text())
    assert result["link"]["shaped_mbps"] == 200 and "tbf" in result["link"]["qdisc"]
    assert 100 < result["link"]["measured_mbps"] < 260          # the probe saw the shaped rate
    row = result["rows"][0]
    assert row["label"] == "data/ddp" and row["bytes_weights"] > 30e6
    assert row["step_ms"] > row["bytes_weights"] * 8 / 200e6 * 1e3 * 0.8   # 34 MB cannot cross 200 Mbit/s faster
    assert set(_our_namespaces()) <= before                    # every namespace it made is gone


def test_predict_with_free_compute_is_the_collectives_fixed_costs_in_a_row():
    """Zero compute and a link of only fixed costs (100 us per collective): every
    collective is waited for, one after another on the FIFO link, so the step is the
    collective count x 100 us, all of it exposed."""
    blocks = describe(tiny(), IMAGE)
    for variant in VARIANTS:
        r = predict(blocks, ZeroCosts(), variant, 4, B, Link(gbps=None, latency_us=0.0, collective_us=100.0))
        count = sum(r.collectives.values())
        assert count >= r.blocking >= 1, variant.label
        assert r.step_s == pytest.approx(count * 1e-4) and r.exposed_s == pytest.approx(r.step_s), variant.label
        assert r.as_dict()["bytes_total"] == r.bytes_total == sum(r.bytes.values())
    # scheme (b) at K=4: one broadcast per round, one reduce-scatter of all rounds' activation
    # gradients, the labels gathered once
    hyb = predict(blocks, ZeroCosts(), Variant("hybrid", scheme="b"), 4, B)
    assert hyb.collectives["broadcast"] == 4 and "reduce" not in hyb.collectives
    # with compute, the next round's broadcast travels during this round's head: part is hidden
    slow_link = Link(gbps=0.05, latency_us=10.0)
    timed = predict(blocks, FlopCosts(blocks, 1e9, 1.0, 10.0), Variant("hybrid", scheme="b"), 4, B, slow_link)
    assert 0.0 < timed.exposed_s < timed.comm_s and 0.0 < timed.hidden < 1.0


def test_link_from_a_bench_result():
    measured = {"measured_mbps": 2340.0, "latency_us": 180.0, "collective_us": {"all_reduce": 400.0, "all_gather": 500.0}}
    assert Link.from_measured(measured) == Link(2.34, 0.0, 450.0)   # the tiny collective's time includes latency
    assert Link.from_measured({"measured_mbps": 2340.0, "latency_us": 180.0}) == Link(2.34, 180.0, 0.0)
    assert Link.from_measured({}) == Link(None, 0.0, 0.0)
    busy = {**measured, "sync_us": 2000.0, "overlap_us_per_mb": 700.0}   # the planner's probe adds these
    assert Link.from_measured(busy) == Link(2.34, 0.0, 450.0, 2000.0, 700.0)


def test_busy_workers_pay_per_rendezvous_and_per_byte_overlapped():
    """``sync_us`` is paid once at every point where a worker blocks on a collective still
    in flight (a synchronous one, or the wait for DDP's buckets) and nowhere else;
    ``overlap_us_per_mb`` lengthens the compute by the bytes the asynchronous ones send."""
    blocks = describe(tiny(), IMAGE)
    costs = FlopCosts(blocks, 1e9, 1.0, 10.0)
    for variant in VARIANTS:
        bare = predict(blocks, costs, variant, 4, B, Link(gbps=1.0, collective_us=50.0))
        sync = predict(blocks, costs, variant, 4, B, Link(gbps=1.0, collective_us=50.0, sync_us=1000.0))
        assert sync.rendezvous >= sync.blocking >= 1, variant.label   # + the waits on async work still in flight
        # every synchronous collective pays; a wait for an asynchronous one pays unless the
        # penalties before it gave it time to finish
        assert sync.blocking * 0.999e-3 <= sync.step_s - bare.step_s <= sync.rendezvous * 1.001e-3, variant.label
        assert sync.compute_s == pytest.approx(bare.compute_s), variant.label
    ddp = Variant("data", "ddp")
    bare = predict(blocks, costs, ddp, 4, B, Link(gbps=1.0))
    over = predict(blocks, costs, ddp, 4, B, Link(gbps=1.0, overlap_us_per_mb=500.0))
    weights = bare.bytes["weights"]   # DDP's buckets are its only asynchronous collectives
    assert over.compute_s - bare.compute_s == pytest.approx(weights / 1e6 * 500e-6)


def test_the_bucketed_strategies_pay_for_copying_gradients_into_their_buckets():
    """DDP copies every gradient into its bucket and the reduced bucket back into the
    gradients; the sharded update copies them into its flat buckets once (the trunk's
    alone in the hybrid); model parallelism has no buckets. The copy is timed once on this
    machine (MeasuredCosts), at memory bandwidth on a profile (FlopCosts)."""
    from onetrick.perf.measure.block_times import MeasuredCosts
    from onetrick.perf.predict.blocks import param_sizes

    blocks = describe(tiny(), IMAGE)
    costs, free = FlopCosts(blocks, 1e9, 1.0, 10.0), FlopCosts(blocks, 1e9, 1.0, 10.0)
    free.copy = lambda nbytes: 0.0

    def copying(variant: Variant) -> float:
        return (predict(blocks, costs, variant, 4, B, Link(gbps=1.0)).compute_s
                - predict(blocks, free, variant, 4, B, Link(gbps=1.0)).compute_s)

    weights = sum(param_sizes(blocks)) * 4
    trunk = sum(param_sizes([b for b in blocks if b.part == "trunk"])) * 4
    assert copying(Variant("data", "ddp")) == pytest.approx(2 * costs.copy(weights))
    assert copying(Variant("data", "sharded")) == pytest.approx(costs.copy(weights), rel=1e-3)   # + padding to K
    assert copying(Variant("hybrid", scheme="b")) == pytest.approx(costs.copy(trunk), rel=1e-3)
    assert copying(Variant("model")) == 0.0
    assert 1e-6 < MeasuredCosts(blocks).copy(2**20) < 1.0   # one MiB


def test_a_link_on_a_machine_twice_as_slow_doubles_every_communication_time():
    """``Link.slower``: what ``--validate-plan`` uses to bring a probe taken at another
    machine speed to the bench's. With free compute a step is communication only, so every
    plan's step doubles exactly: fixed costs, latency, bytes, rendezvous and overlap."""
    blocks = describe(tiny(), IMAGE)
    link = Link(gbps=2.0, latency_us=20.0, collective_us=300.0, sync_us=1000.0, overlap_us_per_mb=700.0,
                op_factor={"all_gather": 0.5})
    for variant in VARIANTS:
        base = predict(blocks, ZeroCosts(), variant, 4, B, link).step_s
        assert predict(blocks, ZeroCosts(), variant, 4, B, link.slower(2.0)).step_s == pytest.approx(2 * base)
    assert link.slower(2.0).op_factor == link.op_factor and Link().slower(2.0) == Link()


def test_contention_adds_the_same_time_to_every_plan():
    """``contention_s`` (what K workers lose to each other per step, measured) lengthens
    every candidate's step by exactly that much, so it never changes the planner's choice."""
    blocks = describe(tiny(), IMAGE)
    costs, link = FlopCosts(blocks, 1e9, 1.0, 10.0), Link(gbps=1.0, collective_us=50.0, sync_us=500.0)
    for variant in VARIANTS:
        base = predict(blocks, costs, variant, 2, B, link, slow=1.5)
        more = predict(blocks, costs, variant, 2, B, link, slow=1.5, contention_s=0.01)
        assert more.step_s == pytest.approx(base.step_s + 0.01) and more.exposed_s == pytest.approx(base.exposed_s)


@pytest.mark.timeout(120)
def test_a_probe_worker_that_fails_is_reported_in_one_line_not_waited_for():
    """The probe's worker processes are fresh interpreters: an error in one comes back as
    the probe's one-line error, well before the timeout."""
    from onetrick.perf.measure.links import _in_processes

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"^loopback link probe failed: TypeError: .*divmod") as err:
        _in_processes(2, functools.partial(divmod))   # divmod(rank, group) raises
    assert "\n" not in str(err.value) and time.monotonic() - t0 < 60


def test_the_busy_worker_probes_measure_something_plausible():
    """Two threads with gloo groups of their own: a blocking 256 KB all-reduce among busy
    workers costs something and less than a second; an overlapped 8 MB all-reduce costs
    the compute beside it under 0.1 s per MB."""
    from onetrick.perf.measure.shared_host import busy_sync_us, measured_link, overlap_us_per_mb

    assert 0.0 <= busy_sync_us(2, count=4, repeats=1) < 1e6
    assert 0.0 <= overlap_us_per_mb(2, count=4, repeats=1) < 1e5
    link = measured_link(2)
    assert link["measured_mbps"] > 0 and {"sync_us", "overlap_us_per_mb", "collective_us"} <= set(link)
    assert set(link["large_op_factor"]) == {"all_reduce", "reduce_scatter", "all_gather"}   # measured in worker processes
    assert all(0.0 < f < 10.0 for f in [*link["op_factor"].values(), *link["large_op_factor"].values()])
