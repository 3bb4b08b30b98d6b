"""--tensorboard: the same scalars as metrics.jsonl, readable by TensorBoard."""
from __future__ import annotations

import json

import pytest

from cli_helpers import FAST, onetrick


@pytest.mark.timeout(180)
def test_tensorboard_holds_the_metrics_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = onetrick("train", "--steps", "12", "--log-every", "4", "--eval-every", "6", "--tensorboard",
                      "--out", tmp_path, *FAST)
    assert result.returncode == 0, result.stderr
    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    assert {"train/loss", "train/train_error", "train/lr", "test/top1_error", "test/top5_error"} <= tags
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    logged = [(e.step, e.value) for e in board.Scalars("train/loss")]
    assert [s for s, _ in logged] == [r["step"] for r in train]
    assert [v for _, v in logged] == pytest.approx([r["loss"] for r in train], rel=1e-6)
