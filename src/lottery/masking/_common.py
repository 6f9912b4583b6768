"""What the hard and the soft masks share: the attribute names they leave on a module and how a
logical parameter name is found on a model."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch import nn

from lottery.errors import ConfigError
from lottery.parameters import HARD_MASK_ATTR, SOFT_MASK_ATTR
from lottery.parameters import join_name as _join
from lottery.parameters import split_name as _split

if TYPE_CHECKING:
    from lottery.masking.soft import SoftMask

_HARD_ATTR = HARD_MASK_ATTR
_HARD_LOAD_HANDLE = "_lottery_hard_load_handle"
_HARD_STAMPS = "_lottery_hard_stamps"  # {tensor name: stamp}, a new stamp at every attach and load
_SOFT_ATTR = SOFT_MASK_ATTR
_SOFT_HANDLES = "_lottery_soft_handles"
_PARAM_ORDER = "_lottery_param_order"  # the module's parameter order before a soft mask was attached
_MASK_SUFFIX = "_mask"
_LOGITS_SUFFIX = "_mask_logits"

#: Default logit of weights pruned by an initial Mask given to attach_soft_mask: sigmoid of it is exactly
#: 0 in float32 and so is its gradient, so such weights stay pruned (finite, so no NaN from weight decay).
PRUNED_LOGIT = -1.0e4


# ============================================================================ names


def _soft_module(module: nn.Module, tensor_name: str) -> "SoftMask":
    return module.parametrizations[tensor_name][0]


def _resolve(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, tensor_name = _split(name)
    try:
        module = model.get_submodule(module_name)
    except AttributeError as exc:
        raise ConfigError(f"{name}: no module {module_name!r} in {type(model).__name__}") from exc
    return module, tensor_name


def _masked_modules(model: nn.Module, attr: str) -> Iterable[tuple[str, nn.Module, str]]:
    """(logical name, module, tensor name) for every tensor with a mask of the given kind."""
    for module_name, module in model.named_modules():
        for tensor_name in module.__dict__.get(attr, ()):
            yield _join(module_name, tensor_name), module, tensor_name
