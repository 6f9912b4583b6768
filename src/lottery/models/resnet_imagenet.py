"""ImageNet ResNet-18 and ResNet-50 (He et al. 2016), with torchvision-compatible parameter names.

A 7x7 stride-2 stem convolution and a 3x3 stride-2 max-pool, four stages of basic (ResNet-18) or
bottleneck (ResNet-50, stride on the 3x3 convolution as in torchvision's "v1.5") blocks with
64/128/256/512 base channels, an adaptive average pool and a Linear classifier. Parameter names and
shapes match torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``,
``fc``), so a torchvision state dict loads into these models. The adaptive pool lets them run on
small images too (e.g. 3x64x64).
"""

from __future__ import annotations

import torch
from torch import nn

from lottery.models._common import (
    check_input_shape,
    check_num_classes,
    init_weights,
    reject_unknown_options,
)
from lottery.models.registry import register_model


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_channels, out_channels, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.downsample = _downsample(in_channels, out_channels, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ImageNetResNet(nn.Module):
    """Stem (``conv1``, ``bn1``, ``relu``, ``maxpool``), ``layer1..4``, ``avgpool``, ``flatten``, ``fc``."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        zero_init_residual: bool = False,
    ):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(self.input_shape[0], 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = 64
        stages = []
        for index, (planes, count) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for position in range(count):
                stride = 2 if (index > 0 and position == 0) else 1
                blocks.append(block(channels, planes, stride))
                channels = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)
        if zero_init_residual:  # Goyal et al. 2017: each residual branch starts as zero
            for module in self.modules():
                if isinstance(module, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(module.last_bn().weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


def _build(name, block, layers, input_shape, num_classes, zero_init_residual=False, **options):
    reject_unknown_options(name, options, accepted=("zero_init_residual",))
    shape = check_input_shape(name, input_shape)
    return ImageNetResNet(
        shape, check_num_classes(name, num_classes), block, layers, bool(zero_init_residual)
    )


@register_model("resnet18", input_shape=(3, 224, 224), num_classes=1000, prune_ignore=())
def resnet18(*, input_shape, num_classes, **options) -> nn.Module:
    """ResNet-18 for ImageNet (basic blocks 2-2-2-2; torchvision parameter names)."""
    return _build("resnet18", BasicBlock, (2, 2, 2, 2), input_shape, num_classes, **options)


@register_model("resnet50", input_shape=(3, 224, 224), num_classes=1000, prune_ignore=())
def resnet50(*, input_shape, num_classes, **options) -> nn.Module:
    """ResNet-50 for ImageNet (bottleneck blocks 3-4-6-3; torchvision parameter names)."""
    return _build("resnet50", Bottleneck, (3, 4, 6, 3), input_shape, num_classes, **options)
