"""A registry of model builders by name, filled by the ``@register_model`` decorator (as timm does)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from lottery.errors import UnknownNameError
from lottery.models._common import check_input_shape, check_num_classes


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of the library needs to know about a registered model.

    ``prune_ignore`` lists parameter names (fnmatch patterns) that are never masked by default,
    following open_lth's choices (docs/methods.md): e.g. VGG and LeNet keep their output layer dense.
    """

    name: str
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]
    num_classes: int = 10
    prune_ignore: tuple[str, ...] = ()
    description: str = ""
    extra: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int = 10,
    prune_ignore: tuple[str, ...] = (),
    description: str = "",
):
    """Register ``builder(input_shape=..., num_classes=..., **kwargs) -> nn.Module`` under ``name``."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelSpec(
            name=name,
            builder=builder,
            input_shape=tuple(input_shape),
            num_classes=num_classes,
            prune_ignore=tuple(prune_ignore),
            description=description or (builder.__doc__ or "").strip().split("\n")[0],
        )
        return builder

    return decorator


def model_names() -> list[str]:
    """Every registered model: lottery's own, those of installed packages (entry points) and those
    registered by modules imported so far."""
    from lottery.models.plugins import load_entry_point_models

    load_entry_point_models()
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        from lottery.models.plugins import load_entry_point_models

        load_entry_point_models()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown model {name!r}; known models: {', '.join(model_names())}; a model of your own is "
            "registered with @register_model in a module given to --import MODULE (docs/tutorial.md)"
        ) from None


def build_model(
    name: str,
    *,
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered model, by default for its own input shape and class count.

    Passing the data set's ``input_shape`` adapts the model (e.g. a CIFAR ResNet on 1x28x28
    Fashion-MNIST); every model accepts any channel count and image size its pooling allows.
    """
    spec = get_model_spec(name)
    # Checked here rather than coerced: int(2.5) or a falsy 0 would otherwise be silently replaced.
    return spec.builder(
        input_shape=check_input_shape(name, spec.input_shape if input_shape is None else input_shape),
        num_classes=check_num_classes(name, spec.num_classes if num_classes is None else num_classes),
        **kwargs,
    )
