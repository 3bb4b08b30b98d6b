"""The planner plans in bounded memory, and its header says what it assumes (issue 36).

``onetrick plan --model torchvision:resnet50 --classes 1000000`` was killed by the kernel's
OOM killer (21.8 GB resident on a 24 GB machine) before it printed a line: the planner built
the real 2048 x 10^6 classifier to describe it, and timed it whole (8 GB of weights, 8 of
gradients). It now describes the classifier on the meta device and times it narrow, scaled
by its width, and times the trunk on no more examples than a bounded memory holds; a GPU
profile builds no real model at all.
"""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading

import pytest
import torch

from onetrick.cli import main as cli
from onetrick.cli import plan as plan_mod
from onetrick.models import build_model, builds
from onetrick.perf.measure.block_times import HEAD_WIDTH, MeasuredCosts
from onetrick.perf.planner import timed_rows
from onetrick.perf.predict.blocks import TIMED_CLASSES, describe, model_blocks

#: the most one ``onetrick plan`` may hold resident
PEAK_BYTES = 3 * 2**30
#: its address space: a safety cap (the planner runs under it, 1.5 GB resident), so that a
#: planner that builds the wide classifier fails at once instead of taking the machine's memory
ADDRESS_SPACE = 6 * 2**30
RESNET50 = ["plan", "--model", "torchvision:resnet50", "--workers", "4", "--batch", "32", "--image-size", "16",
            "--link", "eth-100"]
#: ``onetrick plan`` as users run it, but for the link probe (K gloo processes for ~50 s
#: here, holding no model): a fixed link instead
PLAN = ("import sys; import onetrick.cli.plan as plan; "
        "plan.measured_link = lambda k, threads=1: {'measured_mbps': 1000.0, 'latency_us': 50.0}; "
        "from onetrick.cli.main import main; sys.exit(main(sys.argv[1:]))")
RESNET50_H100 = ["plan", "--model", "torchvision:resnet50", "--workers", "8", "--batch", "64", "--profile", "h100",
                 "--link", "eth-100"]


def _capped() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def peak_run(args: list[str], timeout: float) -> tuple[int, str, str, int]:
    """``onetrick ARGS`` (:data:`PLAN`) in a fresh process under the address-space cap:
    its exit status, stdout, stderr, and the peak resident bytes of it or of any process
    it waited for (``wait4``'s rusage is this child's alone, not every test's before it)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", PLAN, *args], stdout=out, stderr=err,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=_capped)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), usage.ru_maxrss * 1024


@pytest.mark.timeout(400)
@pytest.mark.parametrize("classes, gb", [(10**6, 16), (10**7, 200)])
def test_a_huge_classifier_is_planned_in_bounded_memory(classes, gb):
    """resnet50 at 10^6 and 10^7 classes, K=4, B=32, with workers of ``gb`` GB: the plan
    completes and says which plans fit (the data-parallel ones hold the whole classifier,
    24.6 and 246 GB of weights, gradients and momenta: they do not), under 3 GB (1.5 here;
    the old planner built the real classifier: 8 GB of weights at 10^6 classes, over the cap)."""
    rc, out, err, peak = peak_run([*RESNET50, "--classes", str(classes), "--memory-per-worker", str(gb)], timeout=240)
    assert rc == 0, err[-2000:]
    assert peak < PEAK_BYTES, f"{peak / 2**30:.2f} GB resident"
    rows = {ln.split("|")[1].strip(): ln for ln in out.splitlines() if ln.startswith("| ") and "---" not in ln}
    assert "(does not fit)" in rows["data/ddp"] and "(does not fit)" not in rows["model"], out
    assert f"a head Linear wider than {HEAD_WIDTH} outputs timed at {HEAD_WIDTH}" in out


def test_a_wide_classifier_is_described_on_meta_and_timed_narrow():
    """The real model the planner times is built with at most TIMED_CLASSES classes; its
    blocks say the full width; nothing wider than HEAD_WIDTH is timed, the time is scaled."""
    blocks, model = model_blocks("smallnet", 10**6, 32, with_model=True)
    assert model.head[-1].out_features == TIMED_CLASSES
    assert blocks[-1].linear == (blocks[-1].linear[0], 10**6) and blocks[-1].out_shape == (10**6,)
    assert [(b.name, b.params, b.macs, b.out_shape) for b in blocks] == \
        [(b.name, b.params, b.macs, b.out_shape) for b in model_blocks("smallnet", 10**6, 32)]   # the meta description
    costs = MeasuredCosts(blocks, model=model, reps=1)
    widths = []
    costs._time = lambda module, shape, input_grad: widths.append(module[0].out_features) or (1.0, 2.0)
    j = len(blocks) - 1
    assert costs.head(j, 8, 10**6) == pytest.approx((10**6 / HEAD_WIDTH, 2 * 10**6 / HEAD_WIDTH))
    assert costs.head(j, 8, 1000) == (1.0, 2.0) and widths == [HEAD_WIDTH, 1000]
    del costs._time
    assert costs.overhead(4) >= 0.0   # the step of the narrow model, its 1000 classes


def test_the_trunk_is_timed_on_at_most_timed_rows():
    """Model parallelism runs the trunk at K*B: resnet50 at 224 px, K=4, B=32 saves 10 GiB
    there, so it is timed at B and scaled by the rows; a small trunk is timed at K*B as
    before."""
    _, resnet = model_blocks("torchvision:resnet50", 1000, 224, with_model=True)
    assert timed_rows(resnet, 224, 3, 32) == 32
    blocks, small = model_blocks("smallnet", 10, 32, with_model=True)
    assert timed_rows(small, 32, 3, 32) > 1000
    costs = MeasuredCosts(blocks, model=small, reps=1, max_rows=8)
    rows = []
    costs._time = lambda module, shape, input_grad: rows.append(shape[0]) or (1.0, 2.0)
    assert costs.trunk(1, 32) == pytest.approx(tuple(4 * t for t in costs.trunk(1, 8)))
    assert set(rows) == {8}


@pytest.mark.parametrize("name, image", [("smallnet", 32), ("alexnet2012", 224), ("torchvision:resnet18", 32)])
def test_ordinary_models_are_described_as_before(name, image):
    """At 1000 classes or fewer the blocks are those of the real model, described whole,
    on the meta device as with the model the planner times."""
    torch.manual_seed(0)
    real = describe(build_model(name, 100, 3), image)
    meta = model_blocks(name, 100, image)
    blocks, _ = model_blocks(name, 100, image, with_model=True)
    assert _key(meta) == _key(real) and _key(blocks) == _key(real)


def _key(blocks: list) -> list[tuple]:
    """What the cost model reads of each block (a trunk block's tower count)."""
    return [(b.name, b.part, b.params, b.macs, b.in_shape, b.out_shape, b.linear, b.towers if b.part == "trunk" else 0)
            for b in blocks]


@pytest.fixture
def no_probe(monkeypatch):
    """A GPU profile probes nothing here."""
    def boom(*args, **kwargs):
        raise AssertionError("a GPU profile probed this machine")
    monkeypatch.setattr(plan_mod, "measured_link", boom)
    monkeypatch.setattr(plan_mod, "loopback_link", boom)


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.timeout(120)
def test_a_gpu_plan_says_its_device_precision_source_and_ddp_overlap(capsys, no_probe):
    """The h100 plan of resnet50 names the device and its precision instead of "threads
    per worker", says where its figures come from (FLOP counts; efficiency assumed; the
    profile's measured times are AlexNet's alone), and what it assumes of DDP's overlap,
    with the exposed and total communication of the data/ddp row; no real model is built."""
    before = builds()["real"]
    rc, table, err = run(capsys, *RESNET50_H100)
    assert rc == 0, err
    rc, out, err = run(capsys, *RESNET50_H100, "--json")
    assert rc == 0, err
    assert builds()["real"] == before
    head, compute = table.splitlines()[:2]
    assert "one h100 GPU per worker (fp32)" in head and "thread" not in head
    assert compute.startswith("compute: h100 profile, fp32: each block's multiply-adds at 67 TFLOP/s peak x 50%")
    assert "assumed" in compute and "AlexNet B=128" in compute
    rec = json.loads(out)
    ddp = next(c for c in rec["candidates"] if c["label"] == "data/ddp")
    line = next(ln for ln in table.splitlines() if ln.startswith("DDP (data/ddp): "))
    m = re.search(r"overlapping the rest of backward \(assumed: .*\): ([\d.]+) ms of ([\d.]+) ms of communication "
                  r"exposed$", line)
    assert m, line
    assert (m[1], m[2]) == (f"{ddp['exposed_ms']:.1f}", f"{ddp['comm_ms']:.1f}")
    assert ddp["comm_ms"] > ddp["exposed_ms"] > 0
    assert rec["ddp_overlap"] == line and rec["compute"] == compute[len("compute: "):]
    assert {"threads", "profile", "link_probe", "planner_s", "choice", "candidates"} <= set(rec)


@pytest.mark.timeout(120)
def test_a_gpu_plan_of_ten_million_classes_builds_nothing_real(capsys, no_probe):
    before = builds()["real"]
    rc, out, err = run(capsys, *RESNET50_H100, "--classes", "10000000", "--json")
    assert rc == 0, err
    assert builds()["real"] == before and json.loads(out)["classes"] == 10**7
