"""Which weights are prunable, and the names parameters go by whatever lottery or torch attached.

The lowest layer of masking: the ``Mask`` type (``lottery.masks``) and the code that attaches masks to a
model (``lottery.masking``) both need to know which weights a model has to prune and their *logical*
names (the ``state_dict`` keys of the plain model, ``fc1.weight``, also when a soft mask's
parametrisation or ``torch.nn.utils.prune`` has renamed the tensor). That lives here, so that neither
of them imports the other for it. ``lottery.masking`` re-exports the public names; import them from
there.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from lottery.errors import ConfigError

__all__ = ["PRUNABLE_TYPES", "has_hard_mask", "has_soft_mask", "logical_named_parameters", "prunable_weights"]

#: Module types whose ``weight`` is prunable (subclasses included).
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

HARD_MASK_ATTR = "_lottery_hard_masks"  # tuple of tensor names with a hard mask on this module
SOFT_MASK_ATTR = "_lottery_soft_masks"  # tuple of tensor names with a soft mask on this module


def short_list(names: Iterable[str], limit: int = 20) -> str:
    """``a, b, c, ... (n more)``: names in one-line error messages."""
    names = list(names)
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown


def join_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def split_name(name: str) -> tuple[str, str]:
    module_name, _, tensor_name = name.rpartition(".")
    return module_name, tensor_name


def is_torch_pruned(module: nn.Module, tensor_name: str) -> bool:
    return any(
        isinstance(h, prune.BasePruningMethod) and getattr(h, "_tensor_name", None) == tensor_name
        for h in module._forward_pre_hooks.values()
    )


def has_hard_mask(module: nn.Module, tensor_name: str = "weight") -> bool:
    """Whether ``module.<tensor_name>`` carries a hard mask of this module."""
    return tensor_name in module.__dict__.get(HARD_MASK_ATTR, ())


def has_soft_mask(module: nn.Module, tensor_name: str = "weight") -> bool:
    """Whether ``module.<tensor_name>`` carries a CS soft mask of this module."""
    return tensor_name in module.__dict__.get(SOFT_MASK_ATTR, ())


def trainable_tensor(module: nn.Module, tensor_name: str) -> torch.Tensor | None:
    """The tensor an optimizer trains for the logical ``module.<tensor_name>``."""
    if parametrize.is_parametrized(module, tensor_name):
        return getattr(module.parametrizations[tensor_name], "original", None)
    if is_torch_pruned(module, tensor_name):
        return module._parameters.get(tensor_name + "_orig")
    return module._parameters.get(tensor_name)


def logical_named_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """``named_parameters`` under the names of the plain model.

    ``fc1.parametrizations.weight.original`` (parametrize, e.g. a soft mask) and ``fc1.weight_orig``
    (torch pruning) are reported as ``fc1.weight``; parameters that belong to a parametrisation (the mask
    logits) are left out. Shared parameters are listed once.
    """
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if "parametrizations" in parts:
            i = len(parts) - 1 - parts[::-1].index("parametrizations")
            if i + 3 == len(parts) and parts[i + 2] == "original":
                out[".".join(parts[:i] + [parts[i + 1]])] = p
            continue  # a parametrisation's own parameter, e.g. mask logits
        module_name, tensor_name = split_name(name)
        if tensor_name.endswith("_orig"):
            stem = tensor_name[: -len("_orig")]
            if is_torch_pruned(model.get_submodule(module_name), stem):
                out[join_name(module_name, stem)] = p
                continue
        out[name] = p
    return out


def _matches(pattern: str, param_name: str, module_name: str) -> bool:
    return (
        fnmatchcase(param_name, pattern)
        or fnmatchcase(module_name, pattern)
        or (bool(pattern) and module_name.startswith(pattern + "."))
    )


def prunable_weights(model: nn.Module, ignore: Iterable[str] | str = ()) -> dict[str, nn.Parameter]:
    """The ``weight`` of every Conv1d/Conv2d/Conv3d/Linear (subclasses too) found by type, in module order.

    ``ignore`` holds patterns; a weight is left out when a pattern matches (``fnmatch``, case-sensitive)
    its parameter name (``"fc3.weight"``, ``"*.shortcut.*"``) or its module name (``"fc3"``), or is a
    dotted module-name prefix of it (``"layer1"`` leaves out everything under ``layer1.``). A pattern that
    matches no prunable weight raises :class:`ConfigError` listing the prunable names, so that a typo
    never silently prunes a layer that was meant to stay dense.

    Works on plain, hard-masked, soft-masked and torch-pruned models (the trained tensor is returned under
    the logical name). A weight shared by several modules is listed once, under its first name.
    """
    if isinstance(ignore, str):
        ignore = (ignore,)
    patterns = list(ignore)
    for p in patterns:
        if not isinstance(p, str):
            raise ConfigError(f"ignore patterns must be strings, got {p!r}")
    found: list[tuple[str, str, nn.Parameter]] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        p = trainable_tensor(module, "weight")
        if p is None:
            continue
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise ConfigError(
                f"{join_name(module_name, 'weight')} is not initialised yet (lazy module): run one forward "
                "pass before looking for prunable weights"
            )
        if id(p) in seen:
            continue
        seen.add(id(p))
        found.append((join_name(module_name, "weight"), module_name, p))
    used = [False] * len(patterns)
    out: dict[str, nn.Parameter] = {}
    for param_name, module_name, p in found:
        hit = False
        for i, pattern in enumerate(patterns):
            if _matches(pattern, param_name, module_name):
                used[i] = True
                hit = True
        if not hit:
            out[param_name] = p
    unused = [p for p, u in zip(patterns, used) if not u]
    if unused:
        raise ConfigError(
            f"ignore pattern(s) {unused} match no prunable weight of {type(model).__name__}; "
            f"the prunable weights are: {short_list([f[0] for f in found], 200)}"
        )
    return out
