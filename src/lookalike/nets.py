"""Backbone networks whose forward returns feature maps ``(main, *aux)`` instead of logits.

Pooling is left to the extractor (see ``embedding.pool_maps``). The torchvision networks keep their own
parameter names (the classes are swapped in place), so their standard checkpoints load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import EfficientNet, ResNet

from .efficientnet_lite import EfficientNetLite


class ResNetMaps(ResNet):
    """ResNet -> (layer4 map, layer3 map)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c3 = self.layer3(self.layer2(self.layer1(x)))
        return self.layer4(c3), c3


class EfficientNetMaps(EfficientNet):
    """torchvision EfficientNet -> (head map, last block's map)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        *blocks, head = self.features
        for block in blocks:
            x = block(x)
        return head(x), x


class EfficientNetLiteMaps(EfficientNetLite):
    """EfficientNet-Lite -> (head map, last block's map)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return nn.functional.relu6(self._bn1(self._conv_head(x))), x


class TinyNet(nn.Module):
    """Three random-init convolutions: the test backbone (64-d main map, 32-d aux map)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c2 = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return torch.relu(self.conv3(c2)), c2
