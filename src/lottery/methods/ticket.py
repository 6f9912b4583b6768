"""Lottery tickets inside a user's own training loop: the rewind point and a ticket made from it.

A ticket is a mask applied to the weights of an early point of training (the rewind point, iteration
``k``; ``k = 0`` is the initialisation) and retrained from there with the pruned weights held at 0.
``lottery search cs`` / ``lottery imp`` do this on lottery's engine (pipelines/cs.py ``_retrain_ticket``);
these helpers are the same steps for a loop of one's own:

    rewind = save_rewind_point(model, iteration=k)      # during the search, at iteration k
    ...
    mask = cs.finish()                                   # or any Mask
    ticket_from(model, rewind, mask, optimizer)          # rewind weights x mask, optimizer state reset
    # ... train model with optimizer as before: pruned weights stay exactly 0
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lottery import masking
from lottery.engine.restart import reset_optimizer_state
from lottery.errors import CheckpointError, ConfigError
from lottery.io import load_tensors, save_tensors
from lottery.masks import Mask
from lottery.parameters import short_list


@dataclass(frozen=True)
class RewindPoint:
    """A copy of a model's weights and buffers at one point of training, under the plain model's
    ``state_dict`` keys (``fc1.weight``, ``bn.running_mean``; no ``*_mask`` or ``*_mask_logits`` keys).
    The weights are the raw ones: a CS soft mask is not multiplied in. ``iteration`` is for your records."""

    state: dict[str, torch.Tensor]
    iteration: int | None = None

    def save(self, path: str | os.PathLike) -> None:
        """Write it as safetensors (atomically)."""
        meta = {"iteration": str(self.iteration)} if self.iteration is not None else None
        save_tensors(path, self.state, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "RewindPoint":
        from safetensors import safe_open

        state = load_tensors(path, device)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # load_tensors read it, so this is unexpected; name the file
            raise CheckpointError(f"{path}: cannot read its metadata ({e})") from None
        it = meta.get("iteration")
        return cls(state, int(it) if it is not None else None)


def save_rewind_point(model: nn.Module, iteration: int | None = None) -> RewindPoint:
    """The model's weights and buffers now, copied (``model.state_dict()`` alone returns the live
    tensors, which later training changes). Works on a plain, hard-masked or CS-wrapped model; the
    result always loads into a plain model of the same class."""
    state = masking.to_plain_state_dict(model.state_dict(), apply_masks=False)
    return RewindPoint({k: v.detach().clone() for k, v in state.items()}, iteration)


def ticket_from(
    model: nn.Module,
    rewind: RewindPoint | Mapping[str, torch.Tensor],
    mask: Mask | Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
) -> nn.Module:
    """Make ``model`` the ticket ``mask`` x ``rewind``: load the rewind point's weights and attach
    ``mask`` as a hard mask (pruned weights set to 0; a gradient hook keeps them there). Returns ``model``.

    ``model`` must be plain (a fresh one of the same class, or the one a ``ContinuousSparsification``
    wrapped, after ``cs.finish()``); hard masks it already carries are replaced. With ``optimizer`` its
    per-parameter state (momentum, Adam moments) is dropped for the model's parameters, as a ticket's
    training starts with a fresh optimizer: left-over momentum would move pruned weights away from 0.
    With SGD (momentum, Nesterov, weight decay), Adam and AdamW that keeps pruned weights exactly 0 for
    the whole retraining; with any other optimizer call ``lottery.masking.enforce_masks(model)`` after
    each step.
    """
    soft = list(masking.mask_logits(model))
    if soft:
        raise ConfigError(
            f"{type(model).__name__} still carries CS soft masks (on {short_list(soft, 5)}): call cs.finish() "
            "first, or make the ticket from a fresh model of the same class"
        )
    if not isinstance(mask, Mask):
        mask = Mask(mask)
    mask.validate(model)
    if mask.num_kept() == 0:
        raise ConfigError(
            "the mask keeps none of the weights (density 0): its ticket would be all zeros. A CS mask before "
            "training is 1[s0 > 0] (empty at s0 <= 0): train the search first, or ask for a density"
        )
    state = dict(rewind.state if isinstance(rewind, RewindPoint) else rewind)
    expected = set(masking.to_plain_state_dict(model.state_dict(), apply_masks=False))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        what = [f"{label} keys {short_list(sorted(keys), 5)}"
                for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise ConfigError(f"the rewind point does not fit {type(model).__name__}: {'; '.join(what)} (save it with "
                          "save_rewind_point from a model of this class)")
    masking.remove_hard_mask(model)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"the rewind point does not fit {type(model).__name__}: {e}") from None
    masking.attach_hard_mask(model, mask)
    if optimizer is not None:
        reset_optimizer_state(optimizer, model.parameters())
    return model
