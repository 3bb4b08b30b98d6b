"""AlexNet as used in "One weird trick for parallelizing convolutional neural networks".

Two variants, both plain :class:`~onetrick.models.base.TrunkHeadNet` s for 224x224 inputs:

``alexnet``
    The paper's *one-tower* network (Krizhevsky 2014, section "The network"): five
    convolutional layers (64, 192, 384, 256, 256 filters) followed by three fully
    connected layers (4096, 4096, classes). With 1000 classes it has exactly
    61,100,840 parameters: 2,469,696 in the convolutional trunk (4%) and 58,631,144 in
    the fully connected head (96%), while the trunk holds ~90% of the arithmetic.
    That split is the whole point of the paper: data-parallelise the trunk,
    model-parallelise the head.

``alexnet2012``
    The original two-tower ("two GPU") network of Krizhevsky, Sutskever & Hinton
    (2012), for comparison and for the tower-level model-parallel strategy. Each
    tower holds half the filters of every convolutional layer (48, 128, 192, 192,
    128); the towers exchange activations only at the input of conv3 (and at the FC
    layers). It has 60,965,224 parameters for 1000 classes.

Initialisation (the paper's recipe, applied by :func:`init_alexnet_`):

* weights ~ N(0, 0.01^2) for conv1, conv2 and every Linear layer;
  weights ~ N(0, 0.03^2) for conv3, conv4, conv5;
* biases: 0 for conv1 and conv3, 1 for conv2, conv4, conv5 and the hidden FC
  layers (the 2012 paper's choice, which gives the ReLUs positive inputs early on),
  0 for the final classifier Linear.

Local response normalisation uses cuda-convnet's / the 2012 paper's constants:
size 5, alpha 1e-4, beta 0.75, k 2. As in torchvision, an ``AdaptiveAvgPool2d((6, 6))``
follows the last max-pool; it is the identity at 224x224 and lets other input sizes work.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from onetrick.models.base import TrunkHeadNet, fc_head

__all__ = ["INPUT_SIZE", "Tower", "TwoTowerTrunk", "alexnet", "alexnet2012", "init_alexnet_"]

#: Side of the square input images the AlexNets are designed for.
INPUT_SIZE = 224

#: 256 channels x 6 x 6 at 224x224 input.
FEATURES = 256 * 6 * 6
HIDDEN = (4096, 4096)

# Per conv layer (1..5): (weight std, bias value).
_CONV_INIT = {1: (0.01, 0.0), 2: (0.01, 1.0), 3: (0.03, 0.0), 4: (0.03, 1.0), 5: (0.03, 1.0)}
_FC_STD = 0.01


def _lrn() -> nn.LocalResponseNorm:
    return nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)


def _init_conv_(conv: nn.Conv2d, layer: int) -> None:
    std, bias = _CONV_INIT[layer]
    nn.init.normal_(conv.weight, mean=0.0, std=std)
    nn.init.constant_(conv.bias, bias)


def _init_head_(head: nn.Sequential) -> None:
    linears = [m for m in head if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        nn.init.normal_(lin.weight, mean=0.0, std=_FC_STD)
        # hidden FC layers: bias 1; final classifier: bias 0
        nn.init.constant_(lin.bias, 0.0 if i == len(linears) - 1 else 1.0)


def init_alexnet_(model: TrunkHeadNet) -> TrunkHeadNet:
    """(Re)initialise an ``alexnet`` or ``alexnet2012`` in place with the paper's scheme.

    Conv layers are recognised by their names ``conv1`` .. ``conv5`` (in the one-tower
    trunk and in each tower of the two-tower trunk). Returns ``model``.
    """
    with torch.no_grad():
        for name, module in model.trunk.named_modules():
            if isinstance(module, nn.Conv2d):
                layer = int(name.rsplit(".", 1)[-1].removeprefix("conv"))
                _init_conv_(module, layer)
        _init_head_(model.head)
    return model


def alexnet(num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> TrunkHeadNet:
    """The paper's one-tower AlexNet (61,100,840 parameters for 1000 classes).

    Trunk (``nn.Sequential``, named children)::

        conv1 64 11x11/4 pad 2 -> norm1 (LRN) -> pool1 3/2 -> relu1
        conv2 192 5x5 pad 2   -> relu2 -> norm2 (LRN) -> pool2 3/2
        conv3 384 3x3 pad 1   -> relu3
        conv4 256 3x3 pad 1   -> relu4
        conv5 256 3x3 pad 1   -> relu5 -> pool5 3/2 -> avgpool (adaptive 6x6)

    giving 256x6x6 = 9,216 features at 224x224. Parameter names are thus
    ``trunk.conv1.weight`` ... ``trunk.conv5.bias``. The head is
    ``fc_head(9216, (4096, 4096), num_classes, dropout)``: ``head.0`` (fc6),
    ``head.3`` (fc7), ``head.6`` (classifier), with ReLU and Dropout in between.

    Initialisation: N(0, 0.01^2) weights for conv1, conv2 and all Linear layers,
    N(0, 0.03^2) for conv3-5; biases 0 for conv1, conv3 and the classifier, 1 for
    conv2, conv4, conv5, fc6 and fc7.
    """
    trunk = nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2)),
                ("norm1", _lrn()),
                ("pool1", nn.MaxPool2d(kernel_size=3, stride=2)),
                ("relu1", nn.ReLU(inplace=True)),
                ("conv2", nn.Conv2d(64, 192, kernel_size=5, padding=2)),
                ("relu2", nn.ReLU(inplace=True)),
                ("norm2", _lrn()),
                ("pool2", nn.MaxPool2d(kernel_size=3, stride=2)),
                ("conv3", nn.Conv2d(192, 384, kernel_size=3, padding=1)),
                ("relu3", nn.ReLU(inplace=True)),
                ("conv4", nn.Conv2d(384, 256, kernel_size=3, padding=1)),
                ("relu4", nn.ReLU(inplace=True)),
                ("conv5", nn.Conv2d(256, 256, kernel_size=3, padding=1)),
                ("relu5", nn.ReLU(inplace=True)),
                ("pool5", nn.MaxPool2d(kernel_size=3, stride=2)),
                ("avgpool", nn.AdaptiveAvgPool2d((6, 6))),
            ]
        )
    )
    head = fc_head(FEATURES, HIDDEN, num_classes, dropout)
    return init_alexnet_(TrunkHeadNet(trunk, head))


class Tower(nn.Module):
    """One tower ("GPU") of the 2012 two-tower AlexNet.

    ``stage1`` (conv1 48 11x11/4 pad 2, ReLU, LRN, pool, conv2 128 5x5 pad 2, ReLU, LRN,
    pool) sees only the images and its own activations. ``stage2`` (conv3 192, ReLU,
    conv4 192, ReLU, conv5 128, ReLU, pool, adaptive 6x6 pool) takes as input the
    concatenation of *both* towers' ``stage1`` outputs (256 channels): conv3 is the
    only place the two towers exchange activations in the trunk.
    """

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(in_channels, 48, kernel_size=11, stride=4, padding=2)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("norm1", _lrn()),
                    ("pool1", nn.MaxPool2d(kernel_size=3, stride=2)),
                    ("conv2", nn.Conv2d(48, 128, kernel_size=5, padding=2)),
                    ("relu2", nn.ReLU(inplace=True)),
                    ("norm2", _lrn()),
                    ("pool2", nn.MaxPool2d(kernel_size=3, stride=2)),
                ]
            )
        )
        self.stage2 = nn.Sequential(
            OrderedDict(
                [
                    ("conv3", nn.Conv2d(2 * 128, 192, kernel_size=3, padding=1)),
                    ("relu3", nn.ReLU(inplace=True)),
                    ("conv4", nn.Conv2d(192, 192, kernel_size=3, padding=1)),
                    ("relu4", nn.ReLU(inplace=True)),
                    ("conv5", nn.Conv2d(192, 128, kernel_size=3, padding=1)),
                    ("relu5", nn.ReLU(inplace=True)),
                    ("pool5", nn.MaxPool2d(kernel_size=3, stride=2)),
                    ("avgpool", nn.AdaptiveAvgPool2d((6, 6))),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - convenience only
        raise RuntimeError("a Tower cannot run alone: stage2 needs both towers' stage1 outputs; use TwoTowerTrunk")


class TwoTowerTrunk(nn.Module):
    """The 2012 network's convolutional trunk: two :class:`Tower` s in ``towers``.

    ``forward``: each tower's ``stage1`` runs on the images; their outputs are
    concatenated (N, 256, 13, 13) and fed to every tower's ``stage2``; the two stage2
    outputs are concatenated to (N, 256, 6, 6), tower 0's 128 channels first.
    A model-parallel strategy runs tower ``i`` on worker ``i`` and exchanges the stage1
    outputs.
    """

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.towers = nn.ModuleList([Tower(in_channels) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.cat([t.stage1(x) for t in self.towers], 1)
        return torch.cat([t.stage2(a) for t in self.towers], 1)


def alexnet2012(num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> TrunkHeadNet:
    """The 2012 two-tower AlexNet (60,965,224 parameters for 1000 classes).

    Trunk: :class:`TwoTowerTrunk`; parameter names look like
    ``trunk.towers.0.stage1.conv1.weight`` and ``trunk.towers.1.stage2.conv3.bias``.
    Per tower: conv1 48, conv2 128 (stage1, within the tower), conv3 192 reading both
    towers' conv2 outputs (256 channels), conv4 192, conv5 128 (stage2, within the
    tower). Note the 2012 order ReLU -> LRN -> pool after conv1 (the one-tower net
    pools before the ReLU there).

    Head: ``fc_head(9216, (4096, 4096), num_classes, dropout)``, the same as
    :func:`alexnet`. In the 2012 network fc6 and fc7 are each split into two halves of
    2048 neurons, one per GPU, and every half sees the activations of both towers;
    those halves are exactly the two column (output-neuron) halves of a dense
    4096-wide layer, so a dense head computes the same function, and a model-parallel
    strategy sharding the head by output neurons recovers the 2012 split.

    Initialisation: as :func:`alexnet` (conv1/conv2 and FC weights std 0.01, conv3-5
    std 0.03; biases 1 for conv2, conv4, conv5, fc6, fc7, 0 otherwise), in both towers.
    """
    head = fc_head(FEATURES, HIDDEN, num_classes, dropout)
    return init_alexnet_(TrunkHeadNet(TwoTowerTrunk(in_channels), head))
