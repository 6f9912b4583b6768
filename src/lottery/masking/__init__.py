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
(``fc1.weight``), whatever reparametrisation is attached (``lottery.parameters``).

The package: ``hard`` (hard masks), ``soft`` (soft masks), ``state`` (both kinds: the current mask,
removing masks, state-dict conversion), ``_common`` (what they share). Import from ``lottery.masking``.
"""

from lottery.masking._common import PRUNED_LOGIT
from lottery.masking.hard import (
    attach_hard_mask, enforce_masks, hard_mask_version, pruned_weights_are_zero, remove_hard_mask,
    zero_pruned_optimizer_state_,
)
from lottery.masking.soft import (
    SoftMask, attach_soft_mask, cs_reset_logits_, get_temperature, hard_mask_from_logits, hardened_soft_masks,
    mask_logits, non_mask_parameters, remove_soft_mask, reset_logits_, set_member_s0, set_temperature, soft_mask_penalty,
    soft_mask_values,
)
from lottery.masking.state import (
    current_mask, load_masked_state_dict, mask_from_state_dict, remove_masks, to_plain_state_dict,
)
from lottery.parameters import (
    PRUNABLE_TYPES, has_hard_mask, has_soft_mask, logical_named_parameters, prunable_weights,
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
    "hardened_soft_masks",
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
    "set_member_s0",
    "set_temperature",
    "soft_mask_penalty",
    "soft_mask_values",
    "to_plain_state_dict",
    "zero_pruned_optimizer_state_",
]
