"""The checkpoint format survives the layout redesign: a run that the code before it wrote
(tests/fixtures/pre_redesign_run: 4 of 8 steps, checkpointed at step 4) resumes with
today's code to the very weights the old code reached when it resumed the same run."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _fixture_module():
    spec = importlib.util.spec_from_file_location("pre_redesign_run", FIXTURES / "pre_redesign_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(120)
def test_a_run_written_before_the_redesign_resumes_to_the_same_weights(tmp_path):
    import onetrick

    fx = _fixture_module()
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "pre_redesign_run", run)
    train_set, test_set = fx.data()
    net = fx.model()
    summary = onetrick.fit(net, train_set, test_set, out=run, head="head", resume=True, **fx.OPTIONS)
    assert summary["steps"] == 8
    expected = torch.load(FIXTURES / "pre_redesign_resumed_weights.pt", weights_only=True)
    got = net.state_dict()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), f"{name} differs after resuming the pre-redesign run"
