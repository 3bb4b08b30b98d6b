"""The one structural contract every parallel strategy relies on."""
from __future__ import annotations

import torch
from torch import nn


class TrunkHeadNet(nn.Module):
    """A CNN split into a convolutional ``trunk`` and a fully-connected ``head``.

    ``trunk`` maps images (N, C, H, W) to feature maps; ``head`` is an
    ``nn.Sequential`` of ``nn.Linear`` / ``nn.ReLU`` / ``nn.Dropout`` layers mapping the
    flattened features to logits. Data parallelism replicates the trunk, model
    parallelism shards the Linear layers of the head by output neurons, and the hybrid
    does both. The model itself knows nothing of parallelism.
    """

    trunk: nn.Module
    head: nn.Sequential

    def __init__(self, trunk: nn.Module, head: nn.Sequential) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Flattened last-conv activations: what the hybrid ships between workers."""
        return torch.flatten(self.trunk(images), 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def fc_head(in_features: int, hidden: tuple[int, ...], num_classes: int, dropout: float) -> nn.Sequential:
    """Linear -> ReLU -> Dropout for each hidden width, then the classifier Linear."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


#: Head layers that act on each neuron alone, so a neuron-sharded head applies them to its
#: slice unchanged (Dropout too: each element is dropped independently).
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
               nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
               nn.Identity, nn.Dropout, nn.Flatten)


def unshardable(head: nn.Module) -> str | None:
    """Why ``head`` cannot be split by output neurons (model parallelism, the hybrid), or None.

    A shardable head is an ``nn.Sequential`` of ``nn.Linear`` layers (with or without bias)
    and elementwise layers (:data:`ELEMENTWISE`), with at least one Linear.
    """
    if not isinstance(head, nn.Sequential):
        return f"the head is a {type(head).__name__}, not an nn.Sequential of Linear layers and activations"
    for name, layer in head.named_children():
        if not isinstance(layer, (nn.Linear, *ELEMENTWISE)):
            return (f"head layer head.{name} ({type(layer).__name__}) cannot be sharded by neurons: the head may hold "
                    "only Linear layers, Dropout and elementwise activations (move it into the trunk, or use --strategy data)")
    if not any(isinstance(layer, nn.Linear) for layer in head):
        return "the head has no nn.Linear layer to shard"
    return None
