"""Both kinds of masks at once: the current mask, removing all masks, and converting state dicts
between masked and plain models (see lottery.masking)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import prune

from lottery.errors import ConfigError
from lottery.masks import Mask
from lottery.masking._common import _HARD_ATTR, _LOGITS_SUFFIX, _MASK_SUFFIX, _SOFT_ATTR, _resolve, _soft_module
from lottery.masking.hard import _reorder_parameters, attach_hard_mask, remove_hard_mask
from lottery.masking.soft import attach_soft_mask, remove_soft_mask
from lottery.parameters import PRUNABLE_TYPES, has_hard_mask, has_soft_mask, logical_named_parameters
from lottery.parameters import join_name as _join


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
