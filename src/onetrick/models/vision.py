"""torchvision's classification networks as :class:`TrunkHeadNet` s: ``--model torchvision:NAME``.

Every torchvision classifier qualifies (ResNets, ResNeXts, Wide ResNets, ConvNeXts,
EfficientNets, MobileNets, RegNets, DenseNets, the VGGs, AlexNet, ViT, Swin...), split by
one rule, the same for all of them:

* **the classifier** is the top-level child of the model that holds its last
  ``nn.Linear`` (the one producing the logits): ``fc`` in a ResNet or RegNet,
  ``classifier`` in a VGG, ConvNeXt, EfficientNet or MobileNet, ``heads`` in a ViT;
* **the head** is the classifier's longest tail of ``nn.Linear`` and elementwise layers
  (activations, Dropout): what a neuron-sharded head can split. A classifier that is one
  Linear is that Linear;
* **the trunk** is the whole torchvision model with the classifier replaced by what comes
  before the head in it (``nn.Identity`` when nothing does; ConvNeXt's ``LayerNorm2d`` and
  ``Flatten``). The trunk therefore runs torchvision's own ``forward``, with its functional
  pooling and flattening (DenseNet's ``relu`` + ``adaptive_avg_pool2d``, MobileNetV2's
  pooling, ViT's class token), and its output is exactly what the head would have received.

Models whose logits come from no Linear (SqueezeNet's last convolution), or whose last
Linear sits inside a module that is not an ``nn.Sequential``, are refused in one line.
GoogLeNet and Inception v3 are built without their auxiliary classifiers (a training
forward would return three outputs). Weights are torchvision's own initialisation
(``weights=None``: nothing is downloaded), deterministic under ``torch.manual_seed``.
Input with other than 3 channels (the 1-channel digits) gets a new first convolution of the
same shape otherwise. BatchNorm layers stay in the trunk: under data parallelism each worker
normalises with its own batch's statistics (see the strategies' buffer rule).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from onetrick.models.base import ELEMENTWISE, TrunkHeadNet

PREFIX = "torchvision:"
#: the constructors' options tried in turn (not every model takes each of them)
_OPTIONS = ({"aux_logits": False, "init_weights": True}, {"aux_logits": False}, {})


def _construct(name: str, num_classes: int, dropout: float) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown torchvision model {name!r}; e.g. torchvision:resnet18, torchvision:convnext_tiny, "
                         "torchvision:efficientnet_b0, torchvision:vgg16")
    rng = torch.get_rng_state()  # a refused option may fail after layers drew their initial weights
    for options in _OPTIONS:
        for extra in ({"dropout": dropout}, {}):
            torch.set_rng_state(rng)
            try:
                return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options, **extra)
            except TypeError:  # a constructor without one of these options
                continue
    raise ValueError(f"torchvision:{name} cannot be built with num_classes={num_classes}")


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(parent, child_name, nn.Conv2d(in_channels, child.out_channels, child.kernel_size,
                                                      child.stride, child.padding, child.dilation, child.groups,
                                                      bias=child.bias is not None))
                return


def _shardable_tail(layers: list[nn.Module]) -> int:
    """Index where the longest tail of Linear/elementwise layers holding a Linear starts."""
    start = len(layers)
    while start > 0 and isinstance(layers[start - 1], (nn.Linear, *ELEMENTWISE)):
        start -= 1
    while start < len(layers) and not isinstance(layers[start], (nn.Linear, nn.Dropout)):
        start += 1  # activations before the first Linear have nothing to act on in the head: keep them in the trunk
    return start


def split_classifier(model: nn.Module, label: str) -> TrunkHeadNet:
    """``model`` as a TrunkHeadNet by the module docstring's rule, sharing its modules.

    Parameter names: ``trunk.<torchvision's names>`` (``trunk.conv1.weight``,
    ``trunk.features.0.weight``) and ``head.<index>`` (``head.0.weight`` for a ResNet's
    ``fc``, the classifier's own indices for an ``nn.Sequential`` one). Raises ValueError
    (one line, naming ``label``) when the model has no classifier to split."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{label} has no nn.Linear classifier (its logits come from a convolution): there is no "
                         "fully-connected head to split; pick another model")
    top = linears[-1].split(".", 1)[0]
    classifier = getattr(model, top)
    if isinstance(classifier, nn.Linear):
        head, rest = nn.Sequential(classifier), nn.Identity()
    elif isinstance(classifier, nn.Sequential):
        layers = list(classifier)
        start = _shardable_tail(layers)
        if start == len(layers) or not isinstance(layers[-1], nn.Linear):
            raise ValueError(f"{label}'s classifier `{top}` does not end in Linear layers and activations: "
                             "there is no fully-connected head to split")
        names = [n for n, _ in classifier.named_children()]
        head = nn.Sequential(OrderedDict(zip(names[start:], layers[start:])))
        rest = nn.Sequential(OrderedDict(zip(names[:start], layers[:start]))) if start else nn.Identity()
    else:
        raise ValueError(f"{label}'s last Linear ({linears[-1]}) sits inside a {type(classifier).__name__}, not an "
                         "nn.Sequential classifier: there is no fully-connected head to split")
    setattr(model, top, rest)
    return TrunkHeadNet(model, head)


def torchvision_model(name: str, num_classes: int, in_channels: int = 3, dropout: float = 0.5) -> TrunkHeadNet:
    """torchvision's ``NAME`` (untrained) split into trunk and head (module docstring).

    Raises ValueError (one line) for an unknown name or a network without a
    fully-connected classifier to split.
    """
    model = _construct(name, num_classes, dropout)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return split_classifier(model, f"torchvision:{name}")


def meta_torchvision(name: str, num_classes: int, in_channels: int = 3, dropout: float = 0.5) -> TrunkHeadNet:
    """``NAME`` on the meta device: shapes and parameter counts, no memory. The few
    constructors that compute on tensors (RegNet's), which the meta device cannot, are
    built with 10 classes on the CPU, moved to meta and given ``num_classes`` outputs."""
    try:
        with torch.device("meta"):
            return torchvision_model(name, num_classes, in_channels, dropout)
    except NotImplementedError:
        model = torchvision_model(name, 10, in_channels, dropout).to("meta")
        old = model.head[-1]
        with torch.device("meta"):
            model.head[len(model.head) - 1] = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
        return model


def check_torchvision(name: str, image_size: int, in_channels: int = 3) -> None:
    """Build ``NAME`` on the meta device (no memory, no time) and run a meta image of
    ``image_size`` through trunk and head: a one-line ValueError if either fails."""
    model = meta_torchvision(name, num_classes=10, in_channels=in_channels)
    try:
        model.eval()(torch.empty(1, in_channels, image_size, image_size, device="meta"))
    except (RuntimeError, ValueError, AssertionError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"torchvision:{name} does not run on {image_size}x{image_size} images: {first}") from None
