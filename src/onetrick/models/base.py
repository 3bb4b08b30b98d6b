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
