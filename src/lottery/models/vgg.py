"""CIFAR VGG-11/16/19 with BatchNorm, in the style of open_lth's ``cifar_vgg``.

Blocks are Conv2d(3x3, padding 1, no bias: BatchNorm follows) - BatchNorm2d - ReLU, with 2x2
max-pools between the stages (four of them, as in open_lth: on 32x32 images the last stage sees
2x2 maps). A global average pool then feeds a single Linear 512 -> num_classes, which is kept dense
by default (open_lth's VGG keeps its output layer unpruned).
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

# Numbers are conv widths; "M" is a 2x2 max-pool.
_PLANS: dict[str, tuple] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    "vgg19": (
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512,
    ),
}  # fmt: skip


class VGG(nn.Module):
    """``features`` (Conv2d/BatchNorm2d/ReLU/MaxPool2d), ``avgpool``, ``flatten``, output ``fc``.

    Parameter names: ``features.0.weight`` (first conv), ``features.1.weight`` (its BatchNorm),
    ``fc.weight`` (output layer).
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, plan: tuple):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        channels = self.input_shape[0]
        layers: list[nn.Module] = []
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [
                    nn.Conv2d(channels, item, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(item),
                    nn.ReLU(),
                ]
                channels = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.avgpool(self.features(x))))


def _build(name: str, input_shape, num_classes, options) -> VGG:
    reject_unknown_options(name, options)
    plan = _PLANS[name]
    shape = check_input_shape(name, input_shape, min_size=2 ** plan.count("M"))
    return VGG(shape, check_num_classes(name, num_classes), plan)


_IGNORE = ("fc.weight",)


@register_model("vgg11", input_shape=(3, 32, 32), num_classes=10, prune_ignore=_IGNORE)
def vgg11(*, input_shape, num_classes, **options) -> nn.Module:
    """VGG-11 with BatchNorm for CIFAR (open_lth style); output Linear kept dense."""
    return _build("vgg11", input_shape, num_classes, options)


@register_model("vgg16", input_shape=(3, 32, 32), num_classes=10, prune_ignore=_IGNORE)
def vgg16(*, input_shape, num_classes, **options) -> nn.Module:
    """VGG-16 with BatchNorm for CIFAR (open_lth style); output Linear kept dense."""
    return _build("vgg16", input_shape, num_classes, options)


@register_model("vgg19", input_shape=(3, 32, 32), num_classes=10, prune_ignore=_IGNORE)
def vgg19(*, input_shape, num_classes, **options) -> nn.Module:
    """VGG-19 with BatchNorm for CIFAR (open_lth style); output Linear kept dense."""
    return _build("vgg19", input_shape, num_classes, options)
