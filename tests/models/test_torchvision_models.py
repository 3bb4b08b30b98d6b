"""Every torchvision classifier as a trunk and a head (``--model torchvision:NAME``), and
ResNet-18 under data parallelism and the hybrid against one process."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from onetrick.config import ConfigError, TrainConfig
from onetrick.distributed.runtime import launch
from onetrick.models import build_model, meta_model

# One of each family: the head the rule finds, and torchvision's forward kept exact.
FAMILIES = {
    "resnet18": ["Linear"], "resnext50_32x4d": ["Linear"], "wide_resnet50_2": ["Linear"],
    "convnext_tiny": ["Linear"], "efficientnet_b0": ["Dropout", "Linear"], "mobilenet_v2": ["Dropout", "Linear"],
    "mobilenet_v3_small": ["Linear", "Hardswish", "Dropout", "Linear"], "regnet_x_400mf": ["Linear"],
    "densenet121": ["Linear"], "shufflenet_v2_x0_5": ["Linear"], "googlenet": ["Linear"],
    "alexnet": ["Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"],
    "vgg11_bn": ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"],
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_split_keeps_torchvisions_forward(name):
    import torchvision

    torch.manual_seed(0)
    net = build_model(f"torchvision:{name}", num_classes=7, dropout=0.0).eval()
    torch.manual_seed(0)
    options = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    try:
        ref = torchvision.models.get_model(name, weights=None, num_classes=7, dropout=0.0, **options).eval()
    except TypeError:
        ref = torchvision.models.get_model(name, weights=None, num_classes=7, **options).eval()
    assert [type(m).__name__ for m in net.head] == FAMILIES[name]
    assert isinstance(net.head[-1], nn.Linear) and net.head[-1].out_features == 7
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)  # same weights, the very same function
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in ref.parameters())


def test_trunk_output_is_what_the_classifier_received():
    """ConvNeXt's classifier is LayerNorm2d, Flatten, Linear: the first two stay in the trunk."""
    net = build_model("torchvision:convnext_tiny", num_classes=5).eval()
    assert [type(m).__name__ for m in net.trunk.classifier] == ["LayerNorm2d", "Flatten"]
    assert net.features(torch.randn(1, 3, 64, 64)).shape == (1, 768)
    assert "trunk.conv1.weight" in dict(build_model("torchvision:resnet18", 5).named_parameters())
    assert "head.0.weight" in dict(build_model("torchvision:resnet18", 5).named_parameters())


def test_classes_sets_the_classifier_width_on_the_meta_device():
    net = meta_model("torchvision:resnet50", num_classes=1_000_000)
    assert net.head[-1].weight.shape == (1_000_000, 2048) and net.head[-1].weight.is_meta
    assert meta_model("torchvision:regnet_x_400mf", 123).head[-1].out_features == 123  # built off meta, moved there


@pytest.mark.parametrize("spec, changes, message", [
    ("torchvision:squeezenet1_0", {}, "no nn.Linear classifier"),
    ("torchvision:resnet18", {"image_size": 16, "classes": 3}, None),
    ("torchvision:resnet18", {"classes": 1}, "--classes must be at least 2"),
    ("torchvision:resnet18", {"classes": 7, "data": "synthetic:8"}, "--classes 7 contradicts --data synthetic:8"),
])
def test_bad_models_and_classes_get_one_line(spec, changes, message):
    from onetrick.run.description import check_model_and_data

    cfg = TrainConfig(model=spec, **changes)
    if message is None:
        check_model_and_data(cfg.validate())
        return
    with pytest.raises(ConfigError, match=message) as err:
        check_model_and_data(cfg.validate())
    assert "\n" not in str(err.value)


def test_classes_widens_the_data_and_refuses_fewer_than_the_data_has():
    from onetrick.data import DataError
    from onetrick.run.worker_setup import run_data

    assert run_data(TrainConfig(model="smallnet", data="synthetic", classes=100_000)).num_classes == 100_000
    labels = [int(run_data(TrainConfig(model="smallnet", data="synthetic", classes=50)).train[i][1]) for i in range(200)]
    assert max(labels) >= 10 and max(labels) < 50
    with pytest.raises(DataError, match="--classes 5 is fewer than the 10 classes of digits"):
        run_data(TrainConfig(model="smallnet", classes=5))


@pytest.mark.timeout(400)
def test_resnet18_data_and_hybrid_equal_one_process():
    """ResNet-18 at 32x32 (1x1 after layer4), K=2, B=4, two steps, against one process of
    batch 8 whose trunk normalises each worker's 4 rows by their own statistics and
    keeps worker 0's running statistics (workers.torchvision_reference): BatchNorm under
    data parallelism is per-worker batch statistics, and this reference is that maths
    written out. Model parallelism (every worker the same 8 rows) equals the plain
    one-process step. Running statistics are compared too."""
    from worker_functions import assert_same_weights, base_config, torchvision_reference, torchvision_steps

    data_runs = [dict(strategy="data", sync="ddp"), dict(strategy="data", sync="sharded"),
                 dict(strategy="hybrid", scheme="b"), dict(strategy="hybrid", scheme="a")]
    runs = data_runs + [dict(strategy="model")]
    results = launch(torchvision_steps, base_config(workers=2, lr=0.01), "resnet18", runs, 2, 4, 32, 7, nprocs=2)
    ghost = torchvision_reference(base_config(lr=0.01), "resnet18", 2, 2, 4, 32, 7, per_worker_bn=True)
    plain = torchvision_reference(base_config(lr=0.01), "resnet18", 2, 2, 4, 32, 7)
    assert any("running_mean" in n for n in ghost)
    assert not all(torch.allclose(ghost[n], plain[n]) for n in ghost)  # the two references do differ
    for i, changes in enumerate(runs):
        want = plain if changes["strategy"] == "model" else ghost
        for rank in results:
            assert_same_weights(results[rank][i], want, f"resnet18 {changes} rank {rank}")
