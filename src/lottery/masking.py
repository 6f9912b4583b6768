"""Which weights are prunable, and attaching masks to any ``nn.Module``.

Two kinds of masks, never both on the same weight:

* **Hard masks** (tickets, IMP, fine-tuning): the weight stays an ordinary ``nn.Parameter`` under its own
  name (``state_dict`` key ``fc1.weight``); the mask is a bool buffer ``weight_mask`` on the same module
  (key ``fc1.weight_mask``); pruned weights are zeroed when the mask is attached and a gradient hook on the
  parameter zeroes the pruned entries of every gradient. A pruned weight therefore has zero gradient,
  zero momentum / Adam moments and zero weight decay (decay of 0 is 0): plain SGD, momentum, weight decay,
  Adam and AdamW never move it from 0. The only per-step cost is one ``torch.where`` per masked weight in
  the backward pass. :func:`enforce_masks` re-zeroes pruned weights in place (call it after an optimizer
  step as a cheap safety net: it also re-installs gradient hooks that PyTorch drops, e.g. in
  ``copy.deepcopy``, whose ``Parameter.__deepcopy__`` does not copy tensor hooks).

* **Soft masks** (Continuous Sparsification, docs/methods.md): each selected weight ``w`` gets mask logits ``s``
  (same shape, initialised to ``s0``) and the forward pass uses ``w * m`` with
  ``m = sigmoid(beta * s) / sigmoid(s0)`` (the division is ``scale_by_s0``, default on, so that ``m`` is
  exactly 1 at ``beta = 1``, ``s = s0 = 0``). Implemented with ``torch.nn.utils.parametrize``, whose
  reparametrisation is understood by ``torch.compile`` and supports ``copy.deepcopy``; ``state_dict`` hooks
  rename the keys so that a soft-masked model's ``state_dict`` has the raw weight under its original key
  ``fc1.weight`` and the logits under ``fc1.weight_mask_logits``. The temperature ``beta`` is a
  non-persistent 0-d buffer per layer (changing it never triggers a recompilation) set for all layers by
  :func:`set_temperature`; it is not part of the ``state_dict`` (the trainer's schedule owns it), and
  neither are ``s0`` / ``scale_by_s0``: give the same values when rebuilding a soft-masked model.

Parameter names are always the *logical* ones, i.e. the ``state_dict`` keys of the plain model
(``fc1.weight``), whatever reparametrisation is attached.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from lottery.errors import ConfigError
from lottery.masks import Mask
from lottery.parameters import (  # noqa: F401  (re-exported: lottery.masking is their public path)
    HARD_MASK_ATTR, PRUNABLE_TYPES, SOFT_MASK_ATTR, has_hard_mask, has_soft_mask, is_torch_pruned as _torch_pruned,
    join_name as _join, logical_named_parameters, prunable_weights, short_list as _short_list, split_name as _split,
    trainable_tensor as _trainable_tensor,
)

__all__ = [
    "PRUNABLE_TYPES",
    "PRUNED_LOGIT",
    "SoftMask",
    "attach_hard_mask",
    "attach_soft_mask",
    "cs_reset_logits_",
    "current_mask",
    "enforce_masks",
    "get_temperature",
    "hard_mask_from_logits",
    "has_hard_mask",
    "has_soft_mask",
    "hard_mask_version",
    "load_masked_state_dict",
    "logical_named_parameters",
    "mask_from_state_dict",
    "mask_logits",
    "non_mask_parameters",
    "prunable_weights",
    "pruned_weights_are_zero",
    "remove_hard_mask",
    "remove_masks",
    "remove_soft_mask",
    "reset_logits_",
    "set_temperature",
    "soft_mask_penalty",
    "soft_mask_values",
    "to_plain_state_dict",
    "zero_pruned_optimizer_state_",
]

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


# ============================================================================ soft masks (CS)


# SoftMask -> (the mask tensor of its last forward pass under autograd, a fingerprint of the logits and
# beta it was computed from). Why: a CS step needs m = sigmoid(beta * s) / sigmoid(s0) twice, in the
# forward pass and in the penalty lam * sum(m); computing it once and backpropagating through one graph
# saves the second computation and its backward pass (with the multiply of _reciprocal_scale it took a
# LeNet-300-100 CS step from 2.2x to 1.7x the dense step: benchmarks/RESULTS.md). Only callers that opt in reuse it
# (``soft_mask_values(model, reuse_forward=True)``, as the trainer's CS penalty does right after the
# forward pass): a penalty backpropagated on its own before the task loss needs a graph of its own. An
# entry is used once, only while the logits and beta are the same tensors, storage, dtype, device and
# version as in the forward pass, and is dropped once a backward pass has gone through it. Kept outside
# the module so that deepcopy never meets a non-leaf tensor.
_SHARED_MASKS: "weakref.WeakKeyDictionary[nn.Module, tuple[torch.Tensor, tuple]]" = weakref.WeakKeyDictionary()


def _fingerprint(t: torch.Tensor) -> tuple:
    return (id(t), t.data_ptr(), t.dtype, t.device, t._version)


def _reciprocal_scale(s0: float, dtype: torch.dtype) -> float:
    """The factor r that scales ``sigmoid(s)`` to ``sigmoid(s) / sigmoid(s0)``: 1/sigmoid(s0), nudged by
    one unit in the last place where that makes ``sigmoid(s0) * r == 1`` exactly in ``dtype``. Why a
    factor: a division costs more than a multiplication on CPU; why the nudge: m == 1 exactly where
    beta * s == s0, so a fresh soft mask leaves the dense network exactly as it was."""
    exact = 1.0 / (1.0 + math.exp(-s0))
    if not dtype.is_floating_point:
        return 1.0 / exact
    y = torch.sigmoid(torch.full((67,), s0, dtype=dtype))  # vectorised and scalar-tail paths
    r = torch.tensor(1.0, dtype=dtype) / y[0]
    for candidate in (r, torch.nextafter(r, r + 1), torch.nextafter(r, r - 1)):
        if bool(((y * float(candidate)) == 1).all()):
            return float(candidate)
    return 1.0 / exact


class SoftMask(nn.Module):
    """Parametrisation ``w -> w * sigmoid(beta * s) / sigmoid(s0)`` with trainable logits ``s``."""

    def __init__(self, logits: torch.Tensor, s0: float = 0.0, scale_by_s0: bool = True, beta: float = 1.0):
        super().__init__()
        self.logits = nn.Parameter(logits.detach().clone())
        self.register_buffer(
            "beta", torch.tensor(float(beta), dtype=logits.dtype, device=logits.device), persistent=False
        )
        self.s0 = float(s0)
        self.scale_by_s0 = bool(scale_by_s0)
        self.denominator = 1.0 / (1.0 + math.exp(-self.s0)) if self.scale_by_s0 else 1.0
        self._reciprocals: dict[torch.dtype, float] = {}  # per dtype: the model may be cast later
        self.hard = False  # True inside hardened_soft_masks(): the mask is its beta -> infinity limit

    @property
    def reciprocal(self) -> float:
        """The factor applied to ``sigmoid(beta * s)`` (1 without the scale; see _reciprocal_scale)."""
        if not self.scale_by_s0:
            return 1.0
        dtype = self.logits.dtype
        r = self._reciprocals.get(dtype)
        if r is None:
            r = self._reciprocals[dtype] = _reciprocal_scale(self.s0, dtype)
        return r

    def mask(self) -> torch.Tensor:
        if self.hard:  # 1[s > 0] (times the scale): the network the hard mask will give, for evaluation
            m = (self.logits > 0).to(self.logits.dtype)
        else:
            m = torch.sigmoid(self.beta * self.logits)
        return m * self.reciprocal if self.scale_by_s0 else m

    def shared_mask(self) -> torch.Tensor:
        """:meth:`mask`: the very tensor of the last forward pass if it is still valid (see
        ``_SHARED_MASKS``; used once), so that the penalty and the forward pass share one graph."""
        hit = _SHARED_MASKS.pop(self, None)
        if (hit is not None and torch.is_grad_enabled()
                and hit[1] == (_fingerprint(self.logits), _fingerprint(self.beta))):
            return hit[0]
        return self.mask()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        m = self.mask()
        if m.requires_grad and not torch.compiler.is_compiling():
            _SHARED_MASKS[self] = (m, (_fingerprint(self.logits), _fingerprint(self.beta)))
            ref = weakref.ref(self)
            m.register_hook(lambda grad, ref=ref: _forget_shared(ref))
        return weight * m

    def extra_repr(self) -> str:
        return f"shape={tuple(self.logits.shape)}, s0={self.s0}, scale_by_s0={self.scale_by_s0}"


def _forget_shared(ref: "weakref.ref[SoftMask]") -> None:
    """Gradient hook of a shared mask: the backward pass consumed its graph, so it cannot be reused."""
    module = ref()
    if module is not None:
        _SHARED_MASKS.pop(module, None)


def _soft_state_dict_post_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """Rename ``parametrizations.weight.original`` -> ``weight`` and ``parametrizations.weight.0.logits`` ->
    ``weight_mask_logits``, and order the keys as in the plain module (weight first, logits last)."""
    names = module.__dict__.get(_SOFT_ATTR, ())
    if not names:
        return
    rename = {}
    for t in names:
        rename[f"{prefix}parametrizations.{t}.original"] = prefix + t
        rename[f"{prefix}parametrizations.{t}.0.logits"] = prefix + t + _LOGITS_SUFFIX
    # this module's keys were the last ones added: pop them and put them back in the new order
    own = [k for k in state_dict if k.startswith(prefix)]
    items = [(k, state_dict.pop(k)) for k in own]
    weights = [(rename[k], v) for k, v in items if k in rename and not rename[k].endswith(_LOGITS_SUFFIX)]
    logits = [(rename[k], v) for k, v in items if k in rename and rename[k].endswith(_LOGITS_SUFFIX)]
    others = [(k, v) for k, v in items if k not in rename]
    for k, v in weights + others + logits:
        state_dict[k] = v


def _soft_load_pre_hook(
    module: nn.Module,
    state_dict: dict,
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    for t in module.__dict__.get(_SOFT_ATTR, ()):
        if prefix + t in state_dict:
            state_dict[f"{prefix}parametrizations.{t}.original"] = state_dict.pop(prefix + t)
        if prefix + t + _LOGITS_SUFFIX in state_dict:
            state_dict[f"{prefix}parametrizations.{t}.0.logits"] = state_dict.pop(prefix + t + _LOGITS_SUFFIX)


_INTERNAL_KEY = re.compile(r"(^|\.)parametrizations\.([^.]+)\.(original|0\.logits)$")


def _soft_load_post_hook(module: nn.Module, incompatible_keys: Any) -> None:
    """Report missing/unexpected keys under their public names (``fc1.weight_mask_logits``), not
    parametrize's internal ones."""

    def public(key: str) -> str:
        return _INTERNAL_KEY.sub(lambda m: m[1] + m[2] + ("" if m[3] == "original" else _LOGITS_SUFFIX), key)

    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [public(k) for k in keys]


def _remove_one_soft(module: nn.Module, tensor_name: str, hard: bool) -> torch.Tensor:
    keep = _soft_module(module, tensor_name).logits.detach() > 0
    parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
    # put the parameter back at its original place, so the state_dict key order is the plain module's
    order = module.__dict__.get(_PARAM_ORDER, ())
    if tensor_name in order:
        _reorder_parameters(module, order)
    if hard:
        with torch.no_grad():
            module._parameters[tensor_name].masked_fill_(~keep, 0)
    remaining = tuple(t for t in module.__dict__[_SOFT_ATTR] if t != tensor_name)
    if remaining:
        module.__dict__[_SOFT_ATTR] = remaining
    else:
        del module.__dict__[_SOFT_ATTR]
        module.__dict__.pop(_PARAM_ORDER, None)
        for handle in module.__dict__.pop(_SOFT_HANDLES, ()):
            handle.remove()
    return keep.cpu()


def attach_soft_mask(
    model: nn.Module,
    names_or_mask_init: Iterable[str] | Mask | Mapping[str, torch.Tensor] | None = None,
    s0: float = 0.0,
    scale_by_s0: bool = True,
    *,
    beta: float = 1.0,
    ignore: Iterable[str] | str = (),
    pruned_logit: float = PRUNED_LOGIT,
) -> dict[str, nn.Parameter]:
    """Attach CS soft masks; returns the new logits parameters by weight name (see :func:`mask_logits`).

    ``names_or_mask_init`` selects the weights and their initial logits:

    * ``None``: all prunable weights (minus ``ignore``), logits ``s0``;
    * an iterable of names: these weights, logits ``s0``;
    * a :class:`Mask`: its weights; kept entries start at ``s0``, pruned ones at ``pruned_logit``
      (default -1e4: mask and its gradient exactly 0, so they stay pruned);
    * a mapping name -> tensor: these weights with these initial logits.

    A weight that already has a soft mask gets a fresh one (the old logits are discarded); a weight with a
    hard mask raises :class:`ConfigError`. ``s0``, ``scale_by_s0`` and ``beta`` are stored per layer.
    """
    if not math.isfinite(float(s0)):
        raise ConfigError(f"s0 must be finite, got {s0}")
    init = names_or_mask_init
    if init is None:
        init = list(prunable_weights(model, ignore))
    elif ignore:
        raise ConfigError("attach_soft_mask: 'ignore' only applies when no names are given")
    params = logical_named_parameters(model)
    if isinstance(init, Mask):
        init.validate(model)
        logits_init = {n: torch.where(m, float(s0), float(pruned_logit)) for n, m in init.items()}
    elif isinstance(init, Mapping):
        logits_init = {n: torch.as_tensor(v) for n, v in init.items()}
    else:
        if isinstance(init, str):
            init = [init]
        logits_init = {}
        for n in init:
            if n not in params:
                raise ConfigError(
                    f"{n} is not a parameter of {type(model).__name__}; parameters: {_short_list(params, 50)}"
                )
            logits_init[n] = torch.full(params[n].shape, float(s0))
    targets = []
    for name, s in logits_init.items():
        if name not in params:
            raise ConfigError(f"{name} is not a parameter of {type(model).__name__}")
        module, tensor_name = _resolve(model, name)
        if has_hard_mask(module, tensor_name):
            raise ConfigError(
                f"{name} has a hard mask; a hard and a soft mask cannot be on the same weight: call "
                "remove_hard_mask(model) (or remove_masks) first"
            )
        if _torch_pruned(module, tensor_name):
            raise ConfigError(f"{name} is pruned with torch.nn.utils.prune; remove that first (remove_masks)")
        if parametrize.is_parametrized(module, tensor_name) and not has_soft_mask(module, tensor_name):
            raise ConfigError(f"{name} already has another parametrisation; cannot add a soft mask")
        if tuple(s.shape) != tuple(params[name].shape):
            raise ConfigError(
                f"initial logits for {name}: expected shape {tuple(params[name].shape)}, got {tuple(s.shape)}"
            )
        targets.append((name, module, tensor_name, s))
    out: dict[str, nn.Parameter] = {}
    for name, module, tensor_name, s in targets:
        if has_soft_mask(module, tensor_name):
            _remove_one_soft(module, tensor_name, hard=False)
        w = module._parameters[tensor_name]
        if _PARAM_ORDER not in module.__dict__:
            module.__dict__[_PARAM_ORDER] = tuple(module._parameters)
        sm = SoftMask(s.to(device=w.device, dtype=w.dtype), s0=s0, scale_by_s0=scale_by_s0, beta=beta)
        parametrize.register_parametrization(module, tensor_name, sm)
        module.__dict__[_SOFT_ATTR] = tuple(module.__dict__.get(_SOFT_ATTR, ())) + (tensor_name,)
        if _SOFT_HANDLES not in module.__dict__:
            module.__dict__[_SOFT_HANDLES] = (
                module.register_state_dict_post_hook(_soft_state_dict_post_hook),
                module.register_load_state_dict_pre_hook(_soft_load_pre_hook),
                module.register_load_state_dict_post_hook(_soft_load_post_hook),
            )
        out[name] = sm.logits
    return out


def _soft_masks(model: nn.Module) -> Iterable[tuple[str, SoftMask]]:
    for name, module, tensor_name in _masked_modules(model, _SOFT_ATTR):
        yield name, _soft_module(module, tensor_name)


def set_temperature(model: nn.Module, beta: float) -> None:
    """Set the CS temperature ``beta`` of every soft mask (in place: no recompilation under compile)."""
    beta = float(beta)
    if not (math.isfinite(beta) and beta > 0):
        raise ConfigError(f"temperature beta must be a positive finite number, got {beta}")
    with torch.no_grad():
        for _, sm in _soft_masks(model):
            sm.beta.fill_(beta)


def get_temperature(model: nn.Module) -> float | None:
    """The temperature of the first soft mask (all are set together), or None without soft masks."""
    for _, sm in _soft_masks(model):
        return float(sm.beta)
    return None


@contextlib.contextmanager
def hardened_soft_masks(model: nn.Module) -> Iterator[None]:
    """Inside this block every soft mask computes its beta -> infinity limit ``1[s > 0] / sigmoid(s0)``
    (``1[s > 0]`` without the scale) instead of ``sigmoid(beta * s) / sigmoid(s0)``: the network that
    ``harden_soft_masks`` / ``lottery prune cs`` would give, evaluated without copying or changing the
    model. Why: comparing it with the soft network shows whether the mask has become binary."""
    masks = [sm for _, sm in _soft_masks(model)]
    before = [sm.hard for sm in masks]
    for sm in masks:
        sm.hard = True
    try:
        yield
    finally:
        for sm, b in zip(masks, before):
            sm.hard = b


def mask_logits(model: nn.Module) -> dict[str, nn.Parameter]:
    """The mask logits by weight name, e.g. for the separate logits optimizer (no weight decay)."""
    return {name: sm.logits for name, sm in _soft_masks(model)}


def non_mask_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All parameters except the mask logits (the weight optimizer's parameters)."""
    logit_ids = {id(p) for p in mask_logits(model).values()}
    return [p for p in model.parameters() if id(p) not in logit_ids]


def soft_mask_values(model: nn.Module, reuse_forward: bool = False) -> dict[str, torch.Tensor]:
    """The current soft masks ``m`` by weight name (differentiable w.r.t. the logits).

    ``reuse_forward=True``: the masks computed by the forward pass just run, when still valid, so that a
    loss ``task + lam * sum(m)`` backpropagates through one graph (faster). Only for a value that is
    added to that forward pass's loss and backpropagated with it, right after it."""
    return {name: sm.shared_mask() if reuse_forward else sm.mask() for name, sm in _soft_masks(model)}


def soft_mask_penalty(model: nn.Module, normalize: bool = False, reuse_forward: bool = False) -> torch.Tensor:
    """``sum over layers of sum(m)`` (the reference code's L1 penalty, not normalised); with
    ``normalize=True`` divided by the number of masked weights. Multiply by ``lam`` yourself.
    ``reuse_forward``: see :func:`soft_mask_values`."""
    terms = [m.sum() for m in soft_mask_values(model, reuse_forward).values()]
    if not terms:
        raise ConfigError("the model has no soft masks")
    total = torch.stack(terms).sum() if len(terms) > 1 else terms[0]
    if normalize:
        total = total / sum(sm.logits.numel() for _, sm in _soft_masks(model))
    return total


def hard_mask_from_logits(model: nn.Module) -> Mask:
    """The hard mask ``1[s > 0]`` (strict: ``s == 0`` is pruned), on the CPU."""
    return Mask({name: (sm.logits.detach() > 0).cpu() for name, sm in _soft_masks(model)})


@torch.no_grad()
def reset_logits_(model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """In place ``s <- fn(s)`` for every soft mask (no autograd)."""
    for _, sm in _soft_masks(model):
        sm.logits.copy_(fn(sm.logits))


def cs_reset_logits_(
    model: nn.Module, beta_final: float, s0: float | None = None, reset_temperature: bool = True
) -> None:
    """The CS reset between rounds (paper's intent): ``s <- min(beta_final * s, s0)``, in place.

    Logits that went negative stay negative (scaled by ``beta_final``: still pruned at ``beta = 1``), the
    others restart at ``s0`` (default: each layer's own ``s0``). The reference code sets beta to 1 before
    resetting and so runs ``min(s, s0)``; this function takes ``beta_final`` explicitly and does not
    depend on the current temperature. With ``reset_temperature`` (default) beta is then set to 1.
    """
    beta_final = float(beta_final)
    if not (math.isfinite(beta_final) and beta_final > 0):
        raise ConfigError(f"beta_final must be a positive finite number, got {beta_final}")
    with torch.no_grad():
        for _, sm in _soft_masks(model):
            cap = sm.s0 if s0 is None else float(s0)
            # min: a pruned logit is multiplied by beta_final every round; without a floor it reaches -inf
            # after a dozen rounds (float32, beta_final 4000) and the run stops on a non-finite weight
            sm.logits.copy_(torch.clamp(sm.logits * beta_final, min=PRUNED_LOGIT, max=cap))
    if reset_temperature:
        set_temperature(model, 1.0)


def remove_soft_mask(model: nn.Module, hard: bool = True) -> Mask:
    """Remove every soft mask, leaving plain parameters under their original names.

    With ``hard=True`` (default) the weights become ``w * 1[s > 0]`` (exact zeros); with ``hard=False`` the
    raw weights ``w`` are left as they are. Returns the hard mask ``1[s > 0]`` in both cases.
    """
    out = {}
    for name, module, tensor_name in list(_masked_modules(model, _SOFT_ATTR)):
        out[name] = _remove_one_soft(module, tensor_name, hard)
    return Mask(out)


# ============================================================================ both kinds


def current_mask(model: nn.Module) -> Mask:
    """The model's current binary mask: hard-mask buffers, ``1[s > 0]`` of soft masks and
    ``torch.nn.utils.prune`` masks, in module order, on the CPU."""
    out = {}
    for module_name, module in model.named_modules():
        for t in module.__dict__.get(_HARD_ATTR, ()):
            out[_join(module_name, t)] = module._buffers[t + _MASK_SUFFIX].detach().cpu() != 0
        for t in module.__dict__.get(_SOFT_ATTR, ()):
            out[_join(module_name, t)] = (_soft_module(module, t).logits.detach() > 0).cpu()
        for h in module._forward_pre_hooks.values():
            if isinstance(h, prune.BasePruningMethod):
                t = h._tensor_name
                out[_join(module_name, t)] = module._buffers[t + _MASK_SUFFIX].detach().cpu() != 0
    return Mask(out)


def remove_masks(model: nn.Module) -> Mask:
    """Remove hard, soft (hard=True) and torch-prune masks: a plain module with the original parameter
    names, pruned weights exactly 0, and no hooks or buffers of ours. Returns the removed mask."""
    removed = dict(remove_hard_mask(model).items())
    removed.update(remove_soft_mask(model, hard=True).items())
    for module_name, module in model.named_modules():
        for h in list(module._forward_pre_hooks.values()):
            if isinstance(h, prune.BasePruningMethod):
                t = h._tensor_name
                keep = module._buffers[t + _MASK_SUFFIX].detach() != 0
                prune.remove(module, t)
                if isinstance(module, PRUNABLE_TYPES):  # torch's pruning lost the order: restore weight, bias
                    _reorder_parameters(module, ["weight", "bias"])
                with torch.no_grad():  # orig * mask gives -0.0 and NaN * 0: make the zeros exact
                    module._parameters[t].masked_fill_(~keep, 0)
                removed[_join(module_name, t)] = keep.cpu()
    order = {n: i for i, n in enumerate(logical_named_parameters(model))}
    return Mask({n: removed[n] for n in sorted(removed, key=lambda n: order.get(n, len(order)))})


def mask_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Mask:
    """The binary mask stored in a state_dict: ``*.weight_mask`` (hard mask or torch pruning) and
    ``1[s > 0]`` of ``*.weight_mask_logits`` (soft mask), keyed by the weight's name."""
    out = dict(Mask.from_torch_prune(state_dict).items())
    for key, value in state_dict.items():
        if key.endswith(_LOGITS_SUFFIX):
            stem = key[: -len(_LOGITS_SUFFIX)]
            if stem in state_dict:
                out[stem] = (value.detach() > 0).cpu()
    return Mask(out)


def to_plain_state_dict(state_dict: Mapping[str, torch.Tensor], apply_masks: bool = True) -> dict[str, torch.Tensor]:
    """A state_dict for the plain model: mask keys dropped (``*.weight_mask``, ``*.weight_mask_logits``),
    torch-prune ``*.weight_orig`` renamed to ``*.weight``; with ``apply_masks`` (default) the weights are
    multiplied by their binary mask (exact zeros; soft masks give ``w * 1[s > 0]``). Inputs are not
    modified."""
    masks = mask_from_state_dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(_LOGITS_SUFFIX) and key[: -len(_LOGITS_SUFFIX)] in masks:
            continue
        if key.endswith(_MASK_SUFFIX) and key[: -len(_MASK_SUFFIX)] in masks:
            continue
        if key.endswith("_orig") and key[: -len("_orig")] in masks and key[: -len("_orig")] not in state_dict:
            key = key[: -len("_orig")]
        out[key] = value
    if apply_masks:
        for name, m in masks.items():
            w = out[name]
            out[name] = w.masked_fill(~m.to(w.device), 0)
    return out


def load_masked_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
    *,
    s0: float = 0.0,
    scale_by_s0: bool = True,
) -> Mask:
    """Load a state_dict saved from a plain, hard-masked or soft-masked model into ``model``.

    Hard masks in the state_dict (``*.weight_mask``) are attached as hard masks, soft ones
    (``*.weight_mask_logits``) as soft masks with the given ``s0`` / ``scale_by_s0`` (not stored in a
    state_dict) and their logits loaded. Masks the model already has on other weights stay. Returns the
    binary mask found in the state_dict.
    """
    if any(k.endswith("_orig") and k[: -len("_orig")] + _MASK_SUFFIX in state_dict for k in state_dict):
        raise ConfigError(
            "this state_dict comes from a model pruned with torch.nn.utils.prune; load "
            "to_plain_state_dict(sd) into a plain model and attach Mask.from_torch_prune(sd) as a hard mask"
        )
    hard_names = [n for n in Mask.from_torch_prune(state_dict) if n in state_dict]
    soft_names = [k[: -len(_LOGITS_SUFFIX)] for k in state_dict if k.endswith(_LOGITS_SUFFIX)]
    soft_names = [n for n in soft_names if n in state_dict]
    for n in hard_names:
        if has_soft_mask(*_resolve(model, n)):
            raise ConfigError(f"{n} has a soft mask in the model but a hard mask in the state_dict")
    for n in soft_names:
        if has_hard_mask(*_resolve(model, n)):
            raise ConfigError(f"{n} has a hard mask in the model but a soft mask in the state_dict")
    hard_new = [n for n in hard_names if not has_hard_mask(*_resolve(model, n))]
    if hard_new:
        attach_hard_mask(model, Mask.ones(model, hard_new))
    soft_new = [n for n in soft_names if not has_soft_mask(*_resolve(model, n))]
    if soft_new:
        attach_soft_mask(model, soft_new, s0=s0, scale_by_s0=scale_by_s0)
    model.load_state_dict(state_dict, strict=strict)
    return mask_from_state_dict(state_dict)
