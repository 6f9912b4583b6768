"""Hard masks: a bool buffer beside the weight, pruned weights zeroed and their gradients masked
(see lottery.masking)."""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lottery.errors import ConfigError
from lottery.masks import Mask
from lottery.masking._common import _HARD_ATTR, _HARD_LOAD_HANDLE, _HARD_STAMPS, _MASK_SUFFIX, _masked_modules, _resolve
from lottery.parameters import has_hard_mask, has_soft_mask
from lottery.parameters import is_torch_pruned as _torch_pruned


# ============================================================================ hard masks


# module -> {buffer name: (weakref to the bool mask, its _version, dtype, device, the mask as 0/1 floats)}.
# Why: on CPU, ops driven by a bool mask (torch.where, masked_fill_) are 20-23x slower than a multiply by
# the same mask in floats (benchmarks/speed.py, part maskops); on LeNet's first layer two of them cost
# about 1 ms per step. The
# float copy is rebuilt whenever the bool buffer is replaced (``.to(device)``, re-attaching) or changed
# in place (``load_state_dict`` bumps its version). Kept outside the module so that pickling and
# deepcopy of the model never see it.
_FLOAT_MASKS: "weakref.WeakKeyDictionary[nn.Module, dict[str, tuple]]" = weakref.WeakKeyDictionary()

# Stamps for hard_mask_version: a fresh number whenever a mask is attached or loaded. Why not id() of the
# buffer: a buffer freed by remove_hard_mask and the next one allocated often share an id (and both are
# at _version 0), which would hide a changed mask.
_STAMP_COUNTER = itertools.count(1)


def _stamp(module: nn.Module, tensor_name: str) -> None:
    module.__dict__.setdefault(_HARD_STAMPS, {})[tensor_name] = next(_STAMP_COUNTER)


def _float_mask(module: nn.Module, buffer_name: str, like: torch.Tensor) -> torch.Tensor | None:
    """The module's bool mask buffer as 0/1 in ``like``'s dtype and device (cached; see above)."""
    mask = module._buffers.get(buffer_name)
    if mask is None:
        return None
    per_module = _FLOAT_MASKS.get(module)
    if per_module is None:
        per_module = _FLOAT_MASKS[module] = {}
    hit = per_module.get(buffer_name)
    if (hit is not None and hit[0]() is mask and hit[1] == mask._version and hit[2] == like.dtype
            and hit[3] == like.device):
        return hit[4]
    values = (mask if mask.dtype == torch.bool else mask != 0).to(device=like.device, dtype=like.dtype)
    per_module[buffer_name] = (weakref.ref(mask), mask._version, like.dtype, like.device, values)
    return values


class _GradMask:
    """Parameter hook: zero the pruned entries of the accumulated gradient, reading the module's current
    mask buffer (so that ``model.to(device)`` and ``load_state_dict`` are taken into account)."""

    __slots__ = ("module_ref", "buffer_name")

    def __init__(self, module: nn.Module, buffer_name: str):
        self.module_ref = weakref.ref(module)
        self.buffer_name = buffer_name

    def __call__(self, param: torch.Tensor) -> None:
        # A post-accumulate-grad hook: it runs once ``param.grad`` holds this backward's gradient and
        # masks it in place (no new tensor per step: allocating one cost as much as the multiply).
        grad = param.grad
        module = self.module_ref()
        if grad is None or module is None:
            return
        values = _float_mask(module, self.buffer_name, grad)
        if values is not None:
            # grad * 0/1 equals torch.where(mask, grad, 0) except for non-finite gradient entries at pruned
            # positions (NaN * 0 = NaN); such a step has a non-finite loss, which the trainer stops on.
            grad.mul_(values)


# id(parameter) -> (weakref to the parameter, hook handle, weakref to the owning module). Kept outside the
# Parameter so that pickling and deepcopy of the model see clean parameters (a copied parameter is simply
# absent: its hook is missing). Keyed by id because tensors cannot be dict keys by equality.
_GRAD_HOOKS: dict[int, tuple[weakref.ref, Any, weakref.ref]] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _GRAD_HOOKS.get(key)
    if entry is not None and entry[0] is ref:
        del _GRAD_HOOKS[key]


def _hook_entry(p: torch.Tensor) -> tuple[weakref.ref, Any, weakref.ref] | None:
    entry = _GRAD_HOOKS.get(id(p))
    return entry if entry is not None and entry[0]() is p else None


def _install_grad_hook(module: nn.Module, tensor_name: str) -> None:
    p = module._parameters[tensor_name]
    entry = _hook_entry(p)
    if entry is not None:
        if entry[2]() is module:
            return
        entry[1].remove()
        del _GRAD_HOOKS[id(p)]
    if not p.requires_grad:
        return  # frozen: nothing to mask; enforce_masks installs it if requires_grad is turned on later
    handle = p.register_post_accumulate_grad_hook(_GradMask(module, tensor_name + _MASK_SUFFIX))
    key = id(p)
    _GRAD_HOOKS[key] = (weakref.ref(p, lambda ref, key=key: _forget(key, ref)), handle, weakref.ref(module))


def _remove_grad_hook(p: torch.Tensor | None) -> None:
    entry = _hook_entry(p) if p is not None else None
    if entry is not None:
        entry[1].remove()
        del _GRAD_HOOKS[id(p)]


def _reorder_parameters(module: nn.Module, order: Iterable[str]) -> None:
    """Put ``module._parameters`` in the given order (unknown names last), so that state_dict keys come
    in the plain module's order after a reparametrisation was removed."""
    rank = {k: i for i, k in enumerate(order)}
    params = module._parameters
    items = [(k, params.pop(k)) for k in list(params)]
    for k, v in sorted(items, key=lambda kv: rank.get(kv[0], len(rank))):
        params[k] = v


@torch.no_grad()
def _zero_pruned(module: nn.Module, tensor_name: str) -> None:
    mask = module._buffers[tensor_name + _MASK_SUFFIX]
    if mask.dtype != torch.bool:  # e.g. after load_state_dict(assign=True) of a float mask
        mask = mask != 0
        module._buffers[tensor_name + _MASK_SUFFIX] = mask
    p = module._parameters[tensor_name]
    if p.device.type == "cpu" and p.is_floating_point():
        # CPU fast path: multiply by the cached 0/1 floats (see _float_mask). Pruned weights are already 0
        # after every normal step (their gradient is masked), so this only re-asserts it. A non-finite
        # pruned entry would become NaN (inf * 0); the sum (one cheap pass) notices and masked_fill_ then
        # makes it exactly 0. On GPUs bool-mask ops are fast and need no detour (and no sync).
        p.mul_(_float_mask(module, tensor_name + _MASK_SUFFIX, p))
        if not math.isfinite(float(p.sum())):
            p.masked_fill_(~mask, 0)
    else:
        p.masked_fill_(~mask, 0)


def _hard_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    """load_state_dict post-hook: re-zero pruned weights with the loaded mask and re-install the gradient
    hooks (``load_state_dict(assign=True)`` replaces the parameter objects)."""
    for tensor_name in module.__dict__.get(_HARD_ATTR, ()):
        _stamp(module, tensor_name)
        _zero_pruned(module, tensor_name)
        _install_grad_hook(module, tensor_name)


def attach_hard_mask(model: nn.Module, mask: Mask | Mapping[str, torch.Tensor]) -> nn.Module:
    """Attach a hard mask: zero the pruned weights now and keep them at zero during training.

    Each ``module.weight`` stays a plain ``nn.Parameter``; the mask becomes a bool buffer
    ``module.weight_mask`` (``state_dict`` key ``<module>.weight_mask``) and a gradient hook zeroes the
    pruned gradient entries. Attaching again replaces the mask (no stacked hooks). Weights not named in
    ``mask`` are untouched. Returns ``model``.

    To restore a hard-masked checkpoint: ``attach_hard_mask(fresh, Mask.ones(fresh, names))`` then
    ``fresh.load_state_dict(sd)`` (the mask buffers are loaded and the weights re-zeroed), or simply
    :func:`load_masked_state_dict`.
    """
    if not isinstance(mask, Mask):
        mask = Mask(mask)
    mask.validate(model)
    owners: dict[int, str] = {}
    targets = []
    for name, m in mask.items():
        module, tensor_name = _resolve(model, name)
        if has_soft_mask(module, tensor_name):
            raise ConfigError(
                f"{name} has a soft (CS) mask; a hard and a soft mask cannot be on the same weight: call "
                "remove_soft_mask(model) first"
            )
        if _torch_pruned(module, tensor_name):
            raise ConfigError(
                f"{name} is pruned with torch.nn.utils.prune; read its mask with Mask.from_torch_prune and "
                "remove torch's pruning (remove_masks) before attaching a hard mask"
            )
        p = module._parameters.get(tensor_name)
        if not isinstance(p, nn.Parameter):
            raise ConfigError(f"{name} is not a parameter registered on its module")
        if id(p) in owners:
            raise ConfigError(f"{name} and {owners[id(p)]} are the same (shared) parameter; mask it once")
        owners[id(p)] = name
        buffer_name = tensor_name + _MASK_SUFFIX
        if hasattr(module, buffer_name) and not has_hard_mask(module, tensor_name):
            raise ConfigError(f"{type(module).__name__} at {name!r} already has an attribute {buffer_name!r}")
        targets.append((module, tensor_name, m))
    for module, tensor_name, m in targets:
        p = module._parameters[tensor_name]
        module.register_buffer(tensor_name + _MASK_SUFFIX, m.to(device=p.device, dtype=torch.bool).clone())
        _stamp(module, tensor_name)
        if not has_hard_mask(module, tensor_name):
            module.__dict__[_HARD_ATTR] = tuple(module.__dict__.get(_HARD_ATTR, ())) + (tensor_name,)
        if _HARD_LOAD_HANDLE not in module.__dict__:
            module.__dict__[_HARD_LOAD_HANDLE] = module.register_load_state_dict_post_hook(_hard_after_load)
        _zero_pruned(module, tensor_name)
        _install_grad_hook(module, tensor_name)
    return model


@torch.no_grad()
def enforce_masks(model: nn.Module) -> None:
    """Re-zero every hard-pruned weight in place (no autograd) and re-install missing gradient hooks.

    Cheap; call it after ``optimizer.step()`` as a safety net (e.g. against an optimizer that changes
    weights without a gradient, or after ``copy.deepcopy`` which drops tensor hooks).
    """
    for _, module, tensor_name in _masked_modules(model, _HARD_ATTR):
        _zero_pruned(module, tensor_name)
        _install_grad_hook(module, tensor_name)


def hard_mask_version(model: nn.Module) -> tuple:
    """A value that changes whenever a hard mask is attached, replaced, removed, loaded or edited in place
    (through the tensor, not ``.data``), or a masked weight's gradient hook or ``requires_grad`` changes,
    so that a training loop can tell cheaply, after every step, whether pruned weights could have moved
    (no tensor data is read)."""
    out = []
    for name, module, tensor_name in _masked_modules(model, _HARD_ATTR):
        buf = module._buffers.get(tensor_name + _MASK_SUFFIX)
        p = module._parameters.get(tensor_name)
        out.append((name, module.__dict__.get(_HARD_STAMPS, {}).get(tensor_name), id(buf),
                    None if buf is None else buf._version,
                    None if p is None else (p.requires_grad, _hook_entry(p) is not None)))
    return tuple(out)


@torch.no_grad()
def pruned_weights_are_zero(model: nn.Module) -> bool:
    """Whether every hard-pruned weight is exactly 0 (one pass over the masked weights)."""
    for _, module, tensor_name in _masked_modules(model, _HARD_ATTR):
        p = module._parameters[tensor_name]
        mask = module._buffers[tensor_name + _MASK_SUFFIX]
        if bool((p[~mask.to(device=p.device, dtype=torch.bool)] != 0).any()):
            return False
    return True


@torch.no_grad()
def zero_pruned_optimizer_state_(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Zero, at hard-pruned positions, every per-weight optimizer state tensor of a masked weight
    (SGD's momentum buffer, Adam's moment estimates, ...).

    Why: with a zero gradient (the gradient hook), a zero weight and zero state there, SGD (momentum,
    Nesterov, weight decay) and Adam/AdamW compute a zero update at pruned positions, so pruned weights
    stay exactly 0 without re-zeroing them after each step. State left over from before the mask (a
    rewound optimizer, a mask that changed while training) would move them. Unpruned positions are
    untouched, so training of the kept weights is exactly the same.
    """
    optimizers = list(optimizers)
    for _, module, tensor_name in _masked_modules(model, _HARD_ATTR):
        p = module._parameters[tensor_name]
        for opt in optimizers:
            state = opt.state.get(p)
            if not state:
                continue
            for value in state.values():
                if torch.is_tensor(value) and value.shape == p.shape and value.is_floating_point():
                    value.mul_(_float_mask(module, tensor_name + _MASK_SUFFIX, value))


def remove_hard_mask(model: nn.Module) -> Mask:
    """Remove all hard masks (weights stay zero where pruned); returns the removed mask."""
    out = {}
    for name, module, tensor_name in list(_masked_modules(model, _HARD_ATTR)):
        _zero_pruned(module, tensor_name)
        out[name] = module._buffers[tensor_name + _MASK_SUFFIX].detach().cpu().clone()
        _remove_grad_hook(module._parameters.get(tensor_name))
        del module._buffers[tensor_name + _MASK_SUFFIX]
        stamps = module.__dict__.get(_HARD_STAMPS, {})
        stamps.pop(tensor_name, None)
        if not stamps:
            module.__dict__.pop(_HARD_STAMPS, None)
        remaining = tuple(t for t in module.__dict__[_HARD_ATTR] if t != tensor_name)
        if remaining:
            module.__dict__[_HARD_ATTR] = remaining
        else:
            del module.__dict__[_HARD_ATTR]
            handle = module.__dict__.pop(_HARD_LOAD_HANDLE, None)
            if handle is not None:
                handle.remove()
    return Mask(out)
