"""Helpers shared by the model families: argument checks and weight initialisation."""

from __future__ import annotations

import math
from typing import Iterable

from torch import nn

from lottery.errors import ConfigError


def check_input_shape(model: str, input_shape, *, min_size: int = 1) -> tuple[int, int, int]:
    """Return ``input_shape`` as ``(C, H, W)`` ints, or raise ``ConfigError`` naming the model.

    ``min_size`` is the smallest height/width the model's pooling can take.
    """
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ConfigError(
            f"model {model!r}: input_shape must be (channels, height, width), got {input_shape!r}"
        ) from None
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ConfigError(
            f"model {model!r}: input_shape must be three positive ints (channels, height, width), "
            f"got {input_shape!r}"
        )
    if shape[1] < min_size or shape[2] < min_size:
        raise ConfigError(
            f"model {model!r}: images of {shape[1]}x{shape[2]} are too small for its pooling; "
            f"height and width must be at least {min_size}"
        )
    return shape  # type: ignore[return-value]


def _is_positive_int(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return value == int(value) and value >= 1


def check_num_classes(model: str, num_classes) -> int:
    if not _is_positive_int(num_classes):
        raise ConfigError(f"model {model!r}: num_classes must be a positive int, got {num_classes!r}")
    return int(num_classes)


def check_positive_int(model: str, option: str, value) -> int:
    if not _is_positive_int(value):
        raise ConfigError(f"model {model!r}: option {option!r} must be a positive int, got {value!r}")
    return int(value)


def check_positive_number(model: str, option: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"model {model!r}: option {option!r} must be a positive number, got {value!r}")
    return value


def reject_unknown_options(model: str, options: dict, accepted: Iterable[str] = ()) -> None:
    """Raise ``ConfigError`` if a builder got options it does not understand."""
    if options:
        known = ", ".join(sorted(accepted)) or "none"
        raise ConfigError(
            f"model {model!r} got unknown option(s) {', '.join(sorted(options))}; "
            f"accepted options: {known}"
        )


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convolutions with zero bias; BatchNorm weight 1, bias 0.

    Linear layers keep PyTorch's default initialisation (set when they were constructed).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def pooled_size(size: int, pools: int) -> int:
    """Height or width after ``pools`` 2x2, stride-2 max-pools (each rounding down)."""
    for _ in range(pools):
        size //= 2
    return size
