"""Model zoo: sizes, structure and initialisation of the paper's networks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from onetrick.models import TrunkHeadNet, build_model
from onetrick.models.alexnet import INPUT_SIZE, Tower, TwoTowerTrunk, alexnet, alexnet2012
from onetrick.models.smallnet import INPUT_SIZE as SMALL_INPUT_SIZE
from onetrick.models.smallnet import smallnet

torch.set_num_threads(1)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def alex() -> TrunkHeadNet:
    torch.manual_seed(0)
    return alexnet(num_classes=1000).eval()


@pytest.fixture(scope="module")
def alex2012() -> TrunkHeadNet:
    torch.manual_seed(0)
    return alexnet2012(num_classes=1000).eval()


# ----------------------------------------------------------------------------- alexnet


def test_alexnet_parameter_counts(alex):
    assert _count(alex) == 61_100_840
    assert _count(alex.trunk) == 2_469_696
    assert _count(alex.head) == 58_631_144


def test_alexnet_parameter_names(alex):
    names = dict(alex.named_parameters())
    for n in ("trunk.conv1.weight", "trunk.conv5.bias", "head.0.weight", "head.3.weight", "head.6.bias"):
        assert n in names
    assert names["head.6.weight"].shape == (1000, 4096)


def test_alexnet_features_and_logits_at_224(alex):
    assert INPUT_SIZE == 224
    x = torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE)
    with torch.no_grad():
        f = alex.features(x)
        assert alex.trunk(x).shape == (1, 256, 6, 6)
        assert f.shape == (1, 9216)
        assert alex.head(f).shape == (1, 1000)


def test_alexnet_init(alex):
    t = alex.trunk
    # weights: std 0.01 for conv1-2 and all FC, 0.03 for conv3-5 (within 10%)
    for conv, std in ((t.conv1, 0.01), (t.conv2, 0.01), (t.conv3, 0.03), (t.conv4, 0.03), (t.conv5, 0.03)):
        assert conv.weight.std().item() == pytest.approx(std, rel=0.1)
        assert abs(conv.weight.mean().item()) < 0.1 * std
    for lin in (alex.head[0], alex.head[3], alex.head[6]):
        assert lin.weight.std().item() == pytest.approx(0.01, rel=0.1)
    # biases: 0 for conv1, conv3 and the classifier; 1 for conv2, conv4, conv5, fc6, fc7
    for m, b in ((t.conv1, 0.0), (t.conv2, 1.0), (t.conv3, 0.0), (t.conv4, 1.0), (t.conv5, 1.0),
                 (alex.head[0], 1.0), (alex.head[3], 1.0), (alex.head[6], 0.0)):
        assert torch.all(m.bias == b)


def test_alexnet_lrn_constants(alex):
    lrn = alex.trunk.norm1
    assert isinstance(lrn, nn.LocalResponseNorm)
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 2.0)


def test_alexnet_num_classes_and_channels():
    torch.manual_seed(0)
    m = alexnet(num_classes=10, in_channels=1, dropout=0.3)
    assert m.trunk.conv1.in_channels == 1
    assert m.head[-1].out_features == 10
    assert m.head[2].p == 0.3


# ------------------------------------------------------------------------- alexnet2012


def test_alexnet2012_structure(alex2012):
    trunk = alex2012.trunk
    assert isinstance(trunk, TwoTowerTrunk)
    assert isinstance(trunk.towers, nn.ModuleList) and len(trunk.towers) == 2
    for tower in trunk.towers:
        assert isinstance(tower, Tower)
        s1, s2 = tower.stage1, tower.stage2
        # stage1 only sees its own tower ...
        assert (s1.conv1.out_channels, s1.conv2.in_channels, s1.conv2.out_channels) == (48, 48, 128)
        # ... conv3 reads both towers' conv2 outputs (2 x 128): the only exchange in the trunk ...
        assert (s2.conv3.in_channels, s2.conv3.out_channels) == (256, 192)
        # ... and conv4 / conv5 are within the tower again
        assert (s2.conv4.in_channels, s2.conv4.out_channels) == (192, 192)
        assert (s2.conv5.in_channels, s2.conv5.out_channels) == (192, 128)


def test_alexnet2012_forward_and_exchange(alex2012):
    trunk = alex2012.trunk
    x = torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE)
    with torch.no_grad():
        assert alex2012(x).shape == (1, 1000)
        a0, a1 = (t.stage1(x) for t in trunk.towers)
        assert a0.shape == a1.shape == (1, 128, 13, 13)
        out = trunk(x)
        assert out.shape == (1, 256, 6, 6)
        a = torch.cat([a0, a1], 1)
        assert torch.equal(out, torch.cat([t.stage2(a) for t in trunk.towers], 1))
        # tower 0's stage2 depends on tower 1's stage1 output (the conv3 exchange)
        cut = torch.cat([a0, torch.zeros_like(a1)], 1)
        assert not torch.allclose(trunk.towers[0].stage2(cut), out[:, :128])


def test_alexnet2012_parameter_count(alex2012):
    # Per tower:
    #   conv1  48*3*11*11 + 48    =  17,472
    #   conv2 128*48*5*5  + 128   = 153,728
    #   conv3 192*256*3*3 + 192   = 442,560   (input: both towers' conv2, 256 channels)
    #   conv4 192*192*3*3 + 192   = 331,968
    #   conv5 128*192*3*3 + 128   = 221,312
    #   tower total               = 1,167,040  -> trunk 2 x 1,167,040 = 2,334,080
    # Head (same as alexnet): 9216*4096+4096 + 4096*4096+4096 + 4096*1000+1000 = 58,631,144
    # Total: 2,334,080 + 58,631,144 = 60,965,224
    assert _count(alex2012.trunk.towers[0]) == 1_167_040
    assert _count(alex2012.trunk) == 2_334_080
    assert _count(alex2012.head) == 58_631_144
    assert _count(alex2012) == 60_965_224


def test_alexnet2012_init(alex2012):
    for tower in alex2012.trunk.towers:
        assert tower.stage1.conv1.weight.std().item() == pytest.approx(0.01, rel=0.1)
        assert tower.stage2.conv3.weight.std().item() == pytest.approx(0.03, rel=0.1)
        assert torch.all(tower.stage1.conv2.bias == 1.0)
        assert torch.all(tower.stage2.conv3.bias == 0.0)


# ---------------------------------------------------------------------------- smallnet


def _macs(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Multiply-adds per image of the Conv2d and Linear layers, counted with forward hooks."""
    totals = {"conv": 0, "fc": 0}

    def hook(module, inputs, output):
        n = output.shape[0]
        if isinstance(module, nn.Conv2d):
            per_out = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            totals["conv"] += output.numel() // n * per_out
        else:
            totals["fc"] += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return totals["conv"], totals["fc"]


@pytest.mark.parametrize("in_channels", [1, 3])
def test_smallnet_shapes(in_channels):
    assert SMALL_INPUT_SIZE == 32
    torch.manual_seed(0)
    m = smallnet(num_classes=10, in_channels=in_channels).eval()
    x = torch.randn(2, in_channels, SMALL_INPUT_SIZE, SMALL_INPUT_SIZE)
    with torch.no_grad():
        assert m.trunk(x).shape == (2, 64, 4, 4)
        assert m.features(x).shape == (2, 1024)
        assert m(x).shape == (2, 10)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_smallnet_weights_in_fc_compute_in_conv(in_channels):
    m = smallnet(num_classes=10, in_channels=in_channels).eval()
    fc_params, total = _count(m.head), _count(m)
    assert fc_params / total > 0.9
    conv_macs, fc_macs = _macs(m, torch.zeros(1, in_channels, 32, 32))
    assert conv_macs / (conv_macs + fc_macs) > 0.6


def test_macs_counter_on_alexnet(alex):
    # the paper's premise: conv layers hold ~90% of the compute, FC ~96% of the weights
    conv_macs, fc_macs = _macs(alex, torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE))
    assert fc_macs == 58_621_952  # 9216*4096 + 4096*4096 + 4096*1000
    assert conv_macs / (conv_macs + fc_macs) > 0.85


# ---------------------------------------------------------------------------- registry


def test_build_model_rejects_unknown_name():
    with pytest.raises(ValueError, match="resnet50"):
        build_model("resnet50", num_classes=10)


@pytest.mark.parametrize("name, num_classes", [("smallnet", 10), ("alexnet", 1000)])
def test_build_model_is_deterministic(name, num_classes):
    torch.manual_seed(1234)
    a = build_model(name, num_classes=num_classes)
    torch.manual_seed(1234)
    b = build_model(name, num_classes=num_classes)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.manual_seed(4321)
    c = build_model(name, num_classes=num_classes)
    assert not torch.equal(sa["trunk.conv1.weight"], c.state_dict()["trunk.conv1.weight"])


def test_build_model_passes_arguments():
    torch.manual_seed(0)
    m = build_model("smallnet", num_classes=7, in_channels=1, dropout=0.25)
    assert isinstance(m, TrunkHeadNet)
    assert m.trunk.conv1.in_channels == 1
    assert m.head[-1].out_features == 7
    assert m.head[2].p == 0.25


# ----------------------------------------------------------------------------- user models, torchvision
def _plain_cnn(head_layers: list[nn.Module]) -> nn.Module:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            self.classifier = nn.Sequential(*head_layers)

        def forward(self, x):
            return self.classifier(torch.flatten(self.features(x), 1))

    return Plain()


def test_as_trunk_head_keeps_the_function_and_the_names():
    from onetrick.models import as_trunk_head

    torch.manual_seed(0)
    model = _plain_cnn([nn.Linear(64, 8, bias=False), nn.ReLU(), nn.Linear(8, 3)])
    net = as_trunk_head(model)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(net(x), model(x))
    assert [n for n, _ in net.named_parameters()] == ["trunk.features.0.weight", "trunk.features.0.bias",
                                                      "head.0.weight", "head.2.weight", "head.2.bias"]
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5))
    split = as_trunk_head(seq, head="3")
    assert torch.equal(split(x), seq(x)) and list(split.head) == [seq[3]]


@pytest.mark.parametrize("model, head, message", [
    (nn.Sequential(nn.Conv2d(1, 4, 3)), None, "cannot tell where the trunk of Sequential ends"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Linear(4, 2)), "fc", "Sequential has no child module 'fc'"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Linear(4, 2)), "0", "the trunk would be empty"),
])
def test_as_trunk_head_refuses_in_one_line(model, head, message):
    from onetrick.models import as_trunk_head

    with pytest.raises(ValueError, match=message) as err:
        as_trunk_head(model, head)
    assert "\n" not in str(err.value)


def test_sharded_head_without_bias_equals_the_dense_head():
    """One worker's ShardedHead (Comm() alone: K=1) on a bias-free head: same logits, names."""
    import torch.distributed as dist

    from onetrick.distributed.comm import Comm
    from onetrick.distributed.tensor_parallel import ShardedHead

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(6, 5, bias=False), nn.GELU(), nn.Linear(5, 3, bias=False))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded = ShardedHead(dense, Comm())
        x = torch.randn(4, 6)
        torch.testing.assert_close(sharded(x), dense(x))
    finally:
        dist.destroy_process_group()
    assert sharded.local_to_dense() == {"layers.0.weight": "0.weight", "layers.2.weight": "2.weight"}


@pytest.mark.parametrize("layer, name", [(nn.BatchNorm1d(8), "BatchNorm1d"), (nn.LayerNorm(8), "LayerNorm")])
def test_unshardable_head_layer_is_named(layer, name):
    from onetrick.distributed.comm import Comm
    from onetrick.distributed.tensor_parallel import ShardedHead
    from onetrick.models import unshardable

    head = nn.Sequential(nn.Linear(6, 8), layer, nn.ReLU(), nn.Linear(8, 3))
    assert unshardable(head).startswith(f"head layer head.1 ({name}) cannot be sharded by neurons")
    with pytest.raises(ValueError, match=rf"head\.1 \({name}\)"):
        ShardedHead(head, Comm())
    assert unshardable(nn.Sequential(nn.Dropout(), nn.Linear(6, 3), nn.Tanh())) is None


@pytest.mark.parametrize("name", ["alexnet", "vgg11"])
def test_torchvision_models_split_at_features_and_classifier(name):
    import torchvision

    torch.manual_seed(0)
    net = build_model(f"torchvision:{name}", num_classes=7, in_channels=3, dropout=0.0).eval()
    torch.manual_seed(0)
    ref = torchvision.models.get_model(name, weights=None, num_classes=7, dropout=0.0).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x), ref(x))  # same initialisation, same function
    assert isinstance(net.head[-1], nn.Linear) and net.head[-1].out_features == 7
    assert "trunk.features.0.weight" in dict(net.named_parameters())
    gray = build_model(f"torchvision:{name}", num_classes=10, in_channels=1)
    assert gray.trunk.features[0].in_channels == 1


@pytest.mark.parametrize("spec, size, message", [
    ("torchvision:nope", None, "unknown torchvision model 'nope'"),
    ("torchvision:squeezenet1_0", None, "torchvision:squeezenet1_0 has no nn.Linear classifier"),
    ("torchvision:alexnet", 32, "torchvision:alexnet does not run on 32x32 images"),
    ("resnet", None, "unknown model 'resnet'"),
])
def test_bad_model_names_get_one_line(spec, size, message):
    from onetrick.config import ConfigError, TrainConfig
    from onetrick.run.description import check_model_and_data

    with pytest.raises(ConfigError, match=message) as err:
        check_model_and_data(TrainConfig(model=spec, image_size=size).validate())
    assert "\n" not in str(err.value)
