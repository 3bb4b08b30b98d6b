"""``onetrick bench`` and ``onetrick simulate``: end to end on tiny configurations, the
simulator's byte formulas against the bytes the strategies really send, and the shaped
link in network namespaces (where this machine allows it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from onetrick.bench import COLUMNS, expand_jobs, resolve_link
from onetrick.config import TrainConfig
from onetrick.distributed import parallelize
from onetrick.distributed.runtime import launch
from onetrick.models import TrunkHeadNet, fc_head
from onetrick.netlink import NetnsError, ShapedNetwork, netns_available
from onetrick.simulate import STRATEGY_VARIANTS, _model_blocks, describe, step_bytes

B, IMAGE = 8, 16
VARIANTS = [{"strategy": s, "sync": sy or "ddp", "scheme": sc, "fc_batch": fb} for s, sy, sc, fb in STRATEGY_VARIANTS if s != "single"]


def tiny() -> TrunkHeadNet:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    return TrunkHeadNet(trunk, fc_head(8 * 4 * 4, (50, 30), 10, dropout=0.0))


def measured_bytes(rt, cfg, variants: list[dict]) -> list[dict]:
    """One step of each variant on the tiny model; the bytes this worker's Comm counted."""
    out = []
    for changes in variants:
        strategy = parallelize(tiny(), cfg.replace(**changes), rt)
        g = torch.Generator().manual_seed(rt.rank)
        strategy.comm.take()
        strategy.train_step(torch.randn(B, 3, IMAGE, IMAGE, generator=g), torch.randint(0, 10, (B,), generator=g))
        out.append(strategy.comm.take()["bytes"])
    return out


def run_cli(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "onetrick.cli", *args], capture_output=True, text=True, check=False,
                          timeout=timeout, env=env)


@pytest.mark.timeout(120)
def test_simulated_bytes_equal_bytes_the_strategies_send():
    k = 2
    cfg = TrainConfig(workers=k, threads=1, timeout_s=60, dropout=0.0)
    got = launch(measured_bytes, cfg, VARIANTS, nprocs=k)
    blocks = describe(tiny(), IMAGE)
    for changes, sent0, sent1 in zip(VARIANTS, got[0], got[1]):
        want = step_bytes(blocks, changes["strategy"], k, B, sync=changes["sync"], scheme=changes["scheme"],
                          fc_batch=changes["fc_batch"])
        for rank, sent in enumerate((sent0, sent1)):
            sent = {t: n for t, n in sent.items() if n}
            assert sent == want, f"{changes} rank {rank}"


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
    want = step_bytes(_model_blocks("smallnet", 1000, 32), "hybrid", 2, 4, scheme="b")
    assert {t: int(n) for t, n in hyb["bytes"].items()} == want


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
