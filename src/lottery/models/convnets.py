"""Conv-2, Conv-4 and Conv-6: the small VGG-like CIFAR-10 networks of Frankle & Carbin (2019), Figure 2.

Each is pairs of 3x3 convolutions (padding 1, ReLU) separated by 2x2 max-pools, then fully connected
layers 256-256-num_classes. The flatten size is computed from the input shape, so the networks also
run on e.g. 1x28x28 images.

Option ``width`` (a positive number, default 1) scales every convolution's channel count (rounded, at
least 1); the fully connected layers keep their 256 units. ``conv4`` at ``width=0.125`` (8, 8, 16, 16
channels; the ``fashion_conv4_narrow`` preset) trained a Fashion-MNIST epoch in about 18 s per
single-threaded worker on the 2-core benchmark machine (full-width Conv-4: about 313 s in the speed
benchmark's scaling table): a convolutional network for CPU benchmarks (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch
from torch import nn

from lottery.models._common import (
    check_input_shape,
    check_num_classes,
    check_positive_number,
    init_weights,
    pooled_size,
    reject_unknown_options,
)
from lottery.models.registry import register_model

# Convolution widths per stage; a 2x2 max-pool follows every stage.
_PLANS: dict[str, tuple[tuple[int, ...], ...]] = {
    "conv2": ((64, 64),),
    "conv4": ((64, 64), (128, 128)),
    "conv6": ((64, 64), (128, 128), (256, 256)),
}
_FC_HIDDEN = (256, 256)


class ConvNet(nn.Module):
    """``features`` (Conv2d/ReLU/MaxPool2d), ``flatten``, ``fc_layers`` (Linear/ReLU), output ``fc``.

    Parameter names: ``features.0.weight`` (first conv), ``fc_layers.0.weight`` (first hidden
    Linear), ``fc.weight`` (output layer).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        stages: tuple[tuple[int, ...], ...],
        fc_hidden: tuple[int, ...] = _FC_HIDDEN,
    ):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        channels, height, width = self.input_shape
        layers: list[nn.Module] = []
        for stage in stages:
            for out_channels in stage:
                layers += [nn.Conv2d(channels, out_channels, kernel_size=3, padding=1), nn.ReLU()]
                channels = out_channels
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        size = channels * pooled_size(height, len(stages)) * pooled_size(width, len(stages))
        hidden: list[nn.Module] = []
        for out_features in fc_hidden:
            hidden += [nn.Linear(size, out_features), nn.ReLU()]
            size = out_features
        self.fc_layers = nn.Sequential(*hidden)
        self.fc = nn.Linear(size, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.fc_layers(self.flatten(self.features(x))))


def _build(name: str, input_shape, num_classes, options) -> ConvNet:
    width = check_positive_number(name, "width", options.pop("width", 1))
    reject_unknown_options(name, options, accepted=("width",))
    stages = tuple(tuple(max(1, round(c * width)) for c in stage) for stage in _PLANS[name])
    shape = check_input_shape(name, input_shape, min_size=2 ** len(stages))
    return ConvNet(shape, check_num_classes(name, num_classes), stages)


_IGNORE = ("fc.weight",)


@register_model("conv2", input_shape=(3, 32, 32), num_classes=10, prune_ignore=_IGNORE)
def conv2(*, input_shape, num_classes, **options) -> nn.Module:
    """Conv-2 (Frankle & Carbin 2019): conv 64,64, pool, FC 256,256,classes; output layer kept dense."""
    return _build("conv2", input_shape, num_classes, options)


@register_model("conv4", input_shape=(3, 32, 32), num_classes=10, prune_ignore=_IGNORE)
def conv4(*, input_shape, num_classes, **options) -> nn.Module:
    """Conv-4 (Frankle & Carbin 2019): conv 64,64, pool, 128,128, pool, FC 256,256,classes; output kept dense."""
    return _build("conv4", input_shape, num_classes, options)


@register_model("conv6", input_shape=(3, 32, 32), num_classes=10, prune_ignore=_IGNORE)
def conv6(*, input_shape, num_classes, **options) -> nn.Module:
    """Conv-6 (Frankle & Carbin 2019): conv 64,64,pool,128,128,pool,256,256,pool, FC 256,256,classes."""
    return _build("conv6", input_shape, num_classes, options)
