"""Soft masks of Continuous Sparsification: a parametrisation ``w * sigmoid(beta * s) / sigmoid(s0)``
(see lottery.masking)."""

from __future__ import annotations

import contextlib
import math
import re
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from lottery.errors import ConfigError
from lottery.masks import Mask
from lottery.masking._common import (
    _LOGITS_SUFFIX, _PARAM_ORDER, _SOFT_ATTR, _SOFT_HANDLES, PRUNED_LOGIT, _masked_modules, _resolve, _soft_module,
)
from lottery.masking.hard import _reorder_parameters
from lottery.parameters import has_hard_mask, has_soft_mask, logical_named_parameters, prunable_weights
from lottery.parameters import is_torch_pruned as _torch_pruned
from lottery.parameters import short_list as _short_list


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
        # Stacked searches (set_member_s0): each member's own s0 and scale, broadcast over its slice of the
        # weight; None: the scalar s0 above.
        self.register_buffer("member_s0", None, persistent=False)
        self.register_buffer("member_reciprocals", None, persistent=False)

    @property
    def reciprocal(self) -> float | torch.Tensor:
        """The factor applied to ``sigmoid(beta * s)`` (1 without the scale; see _reciprocal_scale)."""
        if not self.scale_by_s0:
            return 1.0
        if self.member_reciprocals is not None:
            return self.member_reciprocals
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
            # min: a pruned logit is multiplied by beta_final every round; without a floor it reaches -inf
            # after a dozen rounds (float32, beta_final 4000) and the run stops on a non-finite weight
            if s0 is None and sm.member_s0 is not None:  # a stacked search: each member's own s0
                sm.logits.copy_(torch.minimum(torch.clamp(sm.logits * beta_final, min=PRUNED_LOGIT), sm.member_s0))
                continue
            cap = sm.s0 if s0 is None else float(s0)
            sm.logits.copy_(torch.clamp(sm.logits * beta_final, min=PRUNED_LOGIT, max=cap))
    if reset_temperature:
        set_temperature(model, 1.0)


def set_member_s0(model: nn.Module, s0s: Sequence[float]) -> None:
    """Give the members of a stacked network (lottery.engine.stacking) their own ``s0``: every masked
    weight's leading dimension splits into ``len(s0s)`` equal consecutive slices (member-major, as the
    stacked layouts put them), slice k gets ``s0s[k]`` as its scale ``1 / sigmoid(s0)`` (the very factor an
    unstacked mask of that s0 uses) and as its cap in :func:`cs_reset_logits_`. Why: a stack of searches
    that differ in s0 computes all members' masks in one operation per layer."""
    s0s = [float(v) for v in s0s]
    if not s0s or not all(math.isfinite(v) for v in s0s):
        raise ConfigError(f"set_member_s0 needs finite s0 values, got {s0s}")
    for name, sm in _soft_masks(model):
        logits = sm.logits
        if logits.shape[0] % len(s0s):
            raise ConfigError(f"{name}: a leading dimension of {logits.shape[0]} does not split into {len(s0s)} members")
        per = logits.shape[0] // len(s0s)
        shape = (-1,) + (1,) * (logits.dim() - 1)

        def spread(values: list[float]) -> torch.Tensor:
            t = torch.tensor(values, dtype=logits.dtype, device=logits.device)
            return t.repeat_interleave(per).view(shape)

        sm.member_s0 = spread(s0s)
        sm.member_reciprocals = spread([_reciprocal_scale(v, logits.dtype) for v in s0s])


def remove_soft_mask(model: nn.Module, hard: bool = True) -> Mask:
    """Remove every soft mask, leaving plain parameters under their original names.

    With ``hard=True`` (default) the weights become ``w * 1[s > 0]`` (exact zeros); with ``hard=False`` the
    raw weights ``w`` are left as they are. Returns the hard mask ``1[s > 0]`` in both cases.
    """
    out = {}
    for name, module, tensor_name in list(_masked_modules(model, _SOFT_ATTR)):
        out[name] = _remove_one_soft(module, tensor_name, hard)
    return Mask(out)
