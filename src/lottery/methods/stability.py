"""Linear mode connectivity and stability (Frankle et al., ICML 2020), as docs/methods.md states it.

Two copies of a network are trained from the same state with different data orders. Their final
weights are joined by a straight line; the test error is measured at ``points`` evenly spaced places on
it, the two end points included. **Instability** is the largest error on the line minus the mean of
the two end points' errors: 0 when the line is no worse than its ends (the copies are linearly mode
connected), large when a barrier separates them. The **distance** is the L2 norm of the difference of
two networks' prunable weights.

BatchNorm: every floating-point tensor of the state is interpolated, buffers included, so the running
mean and variance on the line are the same blend of the two networks' statistics as the weights (our
choice: the whole state dict is treated as one vector). These statistics are not the ones the
interpolated weights would produce on the data; re-estimating them on training batches (as REPAIR,
Jordan et al. 2022, does) can lower the barrier of BN networks a lot. That is not the default measure;
:func:`instability` does it when given ``bn_loader`` and ``bn_batches`` (:func:`reestimate_batchnorm`: at
every point of the line, end points included, the running statistics are recomputed from training
batches), so a barrier can be told apart from stale statistics. Integer buffers
(BN's ``num_batches_tracked``) are counters that do not affect evaluation; the rounded blend is used.
Boolean buffers (hard masks) must be equal in both states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from lottery.engine import evaluate
from lottery.errors import ConfigError
from lottery.hparams import Hparams
from lottery.step import validate_step_spec

__all__ = ["StabilityHparams", "interpolate_states", "instability", "l2_distance", "reestimate_batchnorm"]


@dataclass(frozen=True)
class StabilityHparams(Hparams):
    """Instability and distance against the rewind point k."""

    rewind_points: tuple[str, ...] = ("0it",)
    points: int = 30  # evaluations on the line, the two end points included
    copy_seeds: tuple[int, ...] = (1, 2)  # data-order seeds of the two copies
    mask: str | None = None  # a mask.safetensors: the copies are that sparse network, from the state at k
    # The state the copies start from, instead of the dense network's at k. Why: a ticket is its mask *and*
    # its rewind weights, and those are its own run's (a CS ticket's come from the search's first round,
    # trained under the soft mask; an IMP-R ticket's from its level 0), not this run's dense network's.
    start_state: str | None = None

    _prefix = "stability"
    _help = {
        "rewind_points": "comma-separated steps k the two copies start from, e.g. 0it,1ep,2ep",
        "points": "evenly spaced points on the line between the copies (end points included)",
        "copy_seeds": "the two copies' data-order seeds",
        "mask": "mask file (e.g. RUN/level_5/mask.safetensors): analyse that sparse network",
        "start_state": "state file the two copies start from (times the mask) instead of the dense network's "
                       "state at k, e.g. a ticket's own RUN/rewind.safetensors; needs exactly one rewind point, "
                       "the one that state was saved at",
    }

    def __post_init__(self) -> None:
        if not self.rewind_points:
            raise ConfigError("StabilityHparams.rewind_points needs at least one step")
        for k in self.rewind_points:
            validate_step_spec(k, "StabilityHparams.rewind_points")
        if len(set(self.rewind_points)) != len(self.rewind_points):
            raise ConfigError(f"StabilityHparams.rewind_points has duplicates: {self.rewind_points}")
        if not isinstance(self.points, int) or isinstance(self.points, bool) or self.points < 2:
            raise ConfigError(f"StabilityHparams.points must be an integer >= 2, got {self.points!r}")
        if len(self.copy_seeds) != 2 or self.copy_seeds[0] == self.copy_seeds[1]:
            raise ConfigError(f"StabilityHparams.copy_seeds must be two different seeds, got {self.copy_seeds}")
        if self.start_state is not None and len(self.rewind_points) != 1:
            raise ConfigError(f"StabilityHparams.start_state is the state at one rewind point, but "
                              f"{len(self.rewind_points)} are given ({','.join(self.rewind_points)}); give only "
                              "the one it was saved at (--rewind-points)")


def interpolate_states(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * a + alpha * b`` for every tensor (exactly ``a`` at 0 and ``b`` at 1).

    Floating tensors (weights, BN running statistics) are blended; integer tensors (counters) take the
    rounded blend; boolean tensors (masks) must be equal and are copied.
    """
    if set(a) != set(b):
        only_a = sorted(set(a) - set(b))
        only_b = sorted(set(b) - set(a))
        raise ConfigError(f"the two states have different keys (only in the first: {only_a[:5]}, "
                          f"only in the second: {only_b[:5]})")
    alpha = float(alpha)
    out = {}
    for k, ta in a.items():
        tb = b[k].to(ta.device)
        if ta.shape != tb.shape:
            raise ConfigError(f"{k}: shapes {tuple(ta.shape)} and {tuple(tb.shape)} differ")
        if ta.is_floating_point():
            out[k] = torch.lerp(ta, tb.to(ta.dtype), alpha)  # lerp is exact at 0 and 1
        elif ta.dtype == torch.bool:
            if not torch.equal(ta, tb):
                raise ConfigError(f"{k}: the two networks have different masks; interpolate networks with one mask")
            out[k] = ta.clone()
        else:
            out[k] = torch.round(torch.lerp(ta.double(), tb.double(), alpha)).to(ta.dtype)
    return out


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, loader: Iterable, batches: int, device: str | torch.device = "cpu") -> int:
    """Recompute every BatchNorm layer's running mean and variance from ``batches`` batches of ``loader``
    (inputs only, in training mode, no gradients, weights untouched), as an equal-weight average over the
    batches (momentum ``None``), then put the model back in evaluation mode. Returns the batches used
    (fewer when the loader ends first); 0 and nothing changed when the model has no BatchNorm.

    Why: on the line between two networks the blended running statistics are not those of the blended
    weights; a barrier measured with them can be stale statistics rather than a loss barrier."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or batches <= 0:
        return 0
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    used = 0
    try:
        for batch in loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device))
            used += 1
            if used >= batches:
                break
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        model.eval()
    return used


def instability(
    model_fn: Callable[[], nn.Module],
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    loader: Iterable,
    points: int = 30,
    device: str | torch.device = "cpu",
    *,
    bn_loader: Iterable | None = None,
    bn_batches: int = 0,
) -> dict[str, Any]:
    """Test error along the line from ``state_a`` to ``state_b`` and the instability.

    ``model_fn()`` returns a network into which both states load (one instance is reused). Returns
    ``alphas`` and ``errors`` (``points`` of each, ``alphas[0] == 0``, ``alphas[-1] == 1``), ``losses``,
    ``error_a``, ``error_b``, ``max_error`` and ``instability = max_error - (error_a + error_b) / 2``
    (errors as fractions in 0..1). With ``bn_loader`` and ``bn_batches`` > 0, BatchNorm statistics are
    recomputed at every point (:func:`reestimate_batchnorm`) instead of blended.
    """
    if not isinstance(points, int) or points < 2:
        raise ConfigError(f"points must be an integer >= 2 (the two end points at least), got {points!r}")
    if bn_batches and bn_loader is None:
        raise ConfigError("bn_batches > 0 needs bn_loader, the training batches the BatchNorm statistics come from")
    model = model_fn().to(device)
    alphas = [i / (points - 1) for i in range(points)]
    errors, losses = [], []
    for alpha in alphas:
        model.load_state_dict(interpolate_states(state_a, state_b, alpha))
        if bn_batches:
            reestimate_batchnorm(model, bn_loader, bn_batches, device)
        m = evaluate(model, loader, device)
        errors.append(1.0 - m["top1"])
        losses.append(m["loss"])
    error_a, error_b = errors[0], errors[-1]
    max_error = max(errors)
    return {
        "alphas": alphas,
        "errors": errors,
        "losses": losses,
        "error_a": error_a,
        "error_b": error_b,
        "max_error": max_error,
        "instability": max_error - (error_a + error_b) / 2,
    }


def l2_distance(
    state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], names: Iterable[str] | None = None
) -> float:
    """``sqrt(sum over names of ||a - b||^2)`` in float64; ``names`` defaults to every floating tensor
    both states have (pass the prunable weights' names for the IMP-R distance)."""
    if names is None:
        names = [k for k, v in state_a.items() if v.is_floating_point() and k in state_b]
    total = torch.zeros((), dtype=torch.float64)
    for n in names:
        if n not in state_a or n not in state_b:
            raise ConfigError(f"{n} is missing from one of the two states")
        d = state_a[n].detach().cpu().double() - state_b[n].detach().cpu().double()
        total += (d * d).sum()
    return float(total.sqrt())
