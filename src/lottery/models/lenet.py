"""LeNet-300-100: the fully connected MNIST network of LeCun et al. (1998) used by Frankle & Carbin (2019)."""

from __future__ import annotations

import math

import torch
from torch import nn

from lottery.models._common import (
    check_input_shape,
    check_num_classes,
    init_weights,
    reject_unknown_options,
)
from lottery.models.registry import register_model


class LeNet(nn.Module):
    """Fully connected network: flatten, hidden Linear+ReLU layers (``fc_layers``), output ``fc``.

    Parameter names: ``fc_layers.0.weight``, ``fc_layers.2.weight``, ..., ``fc.weight``.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, hidden: tuple[int, ...]):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        width = math.prod(self.input_shape)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.fc_layers = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.fc_layers(self.flatten(x)))


@register_model(
    "lenet_300_100",
    input_shape=(1, 28, 28),
    num_classes=10,
    prune_ignore=("fc.weight",),
)
def lenet_300_100(*, input_shape, num_classes, **options) -> nn.Module:
    """LeNet-300-100: fully connected 784-300-100-10 with ReLU (MNIST); output layer kept dense."""
    reject_unknown_options("lenet_300_100", options)
    shape = check_input_shape("lenet_300_100", input_shape)
    return LeNet(shape, check_num_classes("lenet_300_100", num_classes), hidden=(300, 100))
