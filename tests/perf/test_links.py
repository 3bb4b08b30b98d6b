"""Named links (``onetrick plan --link``, ``simulate --link``): a GPU profile plans with its
own interconnect, never with this CPU's loopback, and ``--link measured`` is for this
machine's processes only."""
from __future__ import annotations

import json

import pytest

from onetrick.cli import main as cli
from onetrick.cli import plan as plan_mod
from onetrick.perf.measure import links, shared_host
from onetrick.perf.predict.hardware import NAMED_LINKS, PROFILES

ALEXNET_H100 = ["plan", "--model", "alexnet", "--workers", "8", "--batch", "128", "--profile", "h100"]


@pytest.fixture
def no_probe(monkeypatch):
    """Any loopback probe fails the test."""
    def boom(*args, **kwargs):
        raise AssertionError("a GPU profile probed this machine's loopback")
    for mod in (plan_mod, links, shared_host):
        monkeypatch.setattr(mod, "loopback_link", boom)
    for mod in (plan_mod, shared_host):
        monkeypatch.setattr(mod, "measured_link", boom)


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_every_gpu_profile_names_a_link_of_the_table():
    for name, prof in PROFILES.items():
        if name.startswith("this-"):
            assert prof["link"] == "measured"
        else:
            link = NAMED_LINKS[prof["link"]]
            assert (prof["link_gbps"], prof["latency_us"]) == (link["gbps"], link["latency_us"])
    assert PROFILES["h100"]["link"] == "nvlink4" and PROFILES["a100-pcie"]["link"] == "pcie4"
    assert PROFILES["gtx-titan"]["link"] == PROFILES["k20"]["link"] == "pcie3"


@pytest.mark.timeout(120)
def test_h100_plans_over_nvlink_without_probing(capsys, no_probe):
    rc, out, err = run(capsys, *ALEXNET_H100, "--json")
    assert rc == 0, err
    rec = json.loads(out)
    assert rec["link"]["name"] == "nvlink4" and rec["link"]["gbps"] == 3600.0 and rec["link"]["latency_us"] == 5.0
    assert rec["link_probe"]["kind"].startswith("named")
    assert rec["choice"]["speedup"] > 4, rec["reason"]          # not the 0.33x of the 2.7 Gbit/s loopback
    rc, table, err = run(capsys, *ALEXNET_H100)
    assert rc == 0, err
    assert "link nvlink4: 3600 Gbit/s, 5 us per message" in table.splitlines()[0]
    # a slower named link predicts no faster a step
    rc, out, err = run(capsys, *ALEXNET_H100, "--link", "pcie5", "--json")
    assert rc == 0, err
    pcie = json.loads(out)
    assert pcie["link"]["name"] == "pcie5" and pcie["link"]["gbps"] == 512.0
    assert pcie["choice"]["predicted_step_ms"] >= rec["choice"]["predicted_step_ms"]
    assert pcie["choice"]["speedup"] <= rec["choice"]["speedup"]


@pytest.mark.parametrize("args, msg", [
    (["--link", "measured"], "--link measured probes this machine's loopback between CPU processes; the h100"),
    (["--link-mbps", "measured"], "name a link, e.g. --link nvlink4"),
    (["--link", "nvlink5"], "unknown link 'nvlink5' for --link; choose one of: " + ", ".join(NAMED_LINKS)),
    (["--link", "-3"], "--link must be a link name or a positive number of Mbit/s"),
    (["--link", "pcie5", "--link-mbps", "1000"], "give --link or --link-mbps, not both"),
])
def test_bad_links_are_refused_in_one_line_before_probing(capsys, no_probe, args, msg):
    rc, out, err = run(capsys, *ALEXNET_H100, *args)
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.timeout(120)
def test_a_number_of_mbps_is_still_a_link(capsys, no_probe):
    rc, out, err = run(capsys, *ALEXNET_H100, "--link", "100000", "--json")
    assert rc == 0, err
    rec = json.loads(out)
    assert rec["link"]["gbps"] == 100.0 and rec["link"]["name"] == "100000 Mbit/s" and rec["link_probe"]["kind"] == "given"


@pytest.mark.timeout(120)
def test_simulate_takes_the_named_links(capsys):
    base = ["simulate", "--model", "alexnet", "--profile", "h100", "--workers", "1,8", "--strategies", "data"]
    rc, out, err = run(capsys, *base)
    assert rc == 0, err
    assert "link nvlink4 3600.0 Gbit/s, latency 5 us" in out.splitlines()[0]
    rc, out, err = run(capsys, *base, "--link", "eth-100")
    assert rc == 0, err
    assert "link eth-100 100.0 Gbit/s, latency 10 us" in out.splitlines()[0]
