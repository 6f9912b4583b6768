"""CIFAR ResNet-20/32/56 (He et al. 2016, section 4.2), as used by open_lth and Continuous Sparsification.

A 3x3 stem convolution, then three stages of ``n`` basic blocks (n = 3, 5, 9 for depth 20, 32, 56)
with 16, 32, 64 channels times the ``width`` option (any positive number: ``width=0.25`` gives 4, 8, 16
channels, rounded, at least 1, for CPU benchmarks; only convolution channels scale), stride 2 at the start of stages 2 and 3, a global
average pool and a Linear classifier. Where a block changes the shape, its shortcut is a 1x1
convolution + BatchNorm projection (open_lth's choice; the paper's option A pads with zeros instead,
hence a few thousand more parameters than the published 0.27M for ResNet-20).

Parameter names: ``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.bn1``, ``layer1.0.conv2``,
``layer1.0.bn2``, ``layer2.0.shortcut.0`` (projection conv), ``layer2.0.shortcut.1`` (its BN), ``fc``.
"""

from __future__ import annotations

import torch
from torch import nn

from lottery.models._common import (
    check_input_shape,
    check_num_classes,
    check_positive_number,
    init_weights,
    reject_unknown_options,
)
from lottery.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a ReLU between, plus a shortcut, then a ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: stem, ``layer1..3`` of BasicBlocks, ``avgpool``, ``flatten``, ``fc``."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        blocks_per_stage: int,
        width: float = 1,
    ):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        widths = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(self.input_shape[0], widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        channels = widths[0]
        stages = []
        for index, out_channels in enumerate(widths):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if (index > 0 and block == 0) else 1
                blocks.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def _build(name: str, depth: int, input_shape, num_classes, width=1, **options) -> CifarResNet:
    reject_unknown_options(name, options, accepted=("width",))
    shape = check_input_shape(name, input_shape)
    return CifarResNet(
        shape,
        check_num_classes(name, num_classes),
        blocks_per_stage=(depth - 2) // 6,
        width=check_positive_number(name, "width", width),
    )


@register_model("resnet20", input_shape=(3, 32, 32), num_classes=10, prune_ignore=())
def resnet20(*, input_shape, num_classes, **options) -> nn.Module:
    """ResNet-20 for CIFAR (3 stages x 3 basic blocks, 16/32/64 channels x ``width``)."""
    return _build("resnet20", 20, input_shape, num_classes, **options)


@register_model("resnet32", input_shape=(3, 32, 32), num_classes=10, prune_ignore=())
def resnet32(*, input_shape, num_classes, **options) -> nn.Module:
    """ResNet-32 for CIFAR (3 stages x 5 basic blocks, 16/32/64 channels x ``width``)."""
    return _build("resnet32", 32, input_shape, num_classes, **options)


@register_model("resnet56", input_shape=(3, 32, 32), num_classes=10, prune_ignore=())
def resnet56(*, input_shape, num_classes, **options) -> nn.Module:
    """ResNet-56 for CIFAR (3 stages x 9 basic blocks, 16/32/64 channels x ``width``)."""
    return _build("resnet56", 56, input_shape, num_classes, **options)
