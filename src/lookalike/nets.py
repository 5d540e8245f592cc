"""Backbone networks whose forward returns feature maps ``(main, *aux)`` instead of logits.

Pooling is left to the extractor (see ``embedding.pool_maps``). The torchvision networks keep their own
parameter names (the classes are swapped in place), so their standard checkpoints load unchanged.
"""

from __future__ import annotations

import copy

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
        return self.run_tail(self.run_trunk(x, 0), (self._conv_head, self._bn1))

    # The split fine-tuning trains across (lookalike.finetune_net) and TailEnsembleMaps runs: a frozen trunk, then the
    # last ``tail_blocks`` blocks and the head convolution ("tail parts", in order).
    def tail_parts(self, tail_blocks: int) -> nn.ModuleList:
        first = len(self._blocks) - tail_blocks
        return nn.ModuleList([*self._blocks[first:], self._conv_head, self._bn1])

    def run_trunk(self, x: torch.Tensor, tail_blocks: int) -> torch.Tensor:
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[: len(self._blocks) - tail_blocks]:
            x = block(x)
        return x

    def run_tail(self, x: torch.Tensor, parts) -> tuple[torch.Tensor, torch.Tensor]:
        """The tail ``parts`` (blocks, then head convolution and its BatchNorm) on the trunk's output ``x``."""
        *blocks, conv_head, bn = parts
        for block in blocks:
            x = block(x)
        return nn.functional.relu6(bn(conv_head(x))), x


class TinyNet(nn.Module):
    """Three random-init convolutions: the test backbone (64-d main map, 32-d aux map)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.run_tail(self.run_trunk(x, 1), (self.conv3,))

    def tail_parts(self, tail_blocks: int) -> nn.ModuleList:
        return nn.ModuleList([self.conv3])  # one block whatever is asked: the trunk is everything else

    def run_trunk(self, x: torch.Tensor, tail_blocks: int) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))))

    def run_tail(self, x: torch.Tensor, parts) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.relu(parts[0](x)), x


class TailEnsembleMaps(nn.Module):
    """A backbone and fine-tuned copies of its tail on the shared frozen trunk: ``tune: finetune``'s network.

    Returns (each tuned tail's main map, the base main map, each tuned tail's aux map, the base aux map), so the
    pooled raw vector starts with the (first) fine-tuned embedding (what an untuned index compares, as a model's
    ``dim`` first values) and carries the base model's raw vector too, which the catalog projection turns into the
    base model's LDA: the index's ensemble (:func:`lookalike.tuning.fit_ensemble`). The trunk runs once; each tail
    costs little (on EfficientNet-Lite0 the last block and the head convolution work on an 8 x 8 map at 256 px).
    """

    def __init__(self, base: nn.Module, tail_blocks: int, tuned_tails: int = 1):
        super().__init__()
        self.base = base
        self.tail_blocks = tail_blocks
        self.tuned = nn.ModuleList(copy.deepcopy(base.tail_parts(tail_blocks)) for _ in range(tuned_tails))
        self._base_tail = tuple(base.tail_parts(tail_blocks))  # the base model's own (its modules, not registered)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.run_tails(self.base.run_trunk(x, self.tail_blocks))

    def run_tails(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The maps from the trunk's output: main maps (tuned tails, then base), then aux maps in the same order."""
        outs = [self.base.run_tail(x, parts) for parts in self.tuned]
        outs.append(self.base.run_tail(x, self._base_tail))
        return tuple(main for main, _ in outs) + tuple(aux for _, aux in outs)
