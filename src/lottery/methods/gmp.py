"""Gradual magnitude pruning (Zhu & Gupta, *To prune, or not to prune*, 2017), as docs/methods.md states it.

One training run of the recipe, from the network's initialisation, during which the sparsity grows
from ``s_i`` to ``s_f`` along::

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3        for t0 <= t <= t0 + n * dt

pruning by weight magnitude (global or layer-wise, :func:`lottery.methods.imp.one_shot_magnitude` with
the current mask, so a removed weight never returns) every ``dt`` iterations at ``t = t0, t0 + dt, ...,
t0 + n * dt``; before ``t0`` nothing is pruned, after ``t0 + n * dt`` training goes on at the final
density to the end of the recipe. In densities (``d = 1 - s``) the same curve reads
``d_t = d_f + (d_i - d_f) * (1 - (t - t0) / (n * dt)) ** 3``; with the default ``d_i = 1`` it falls from
1 to the target. At ``t0 + n * dt`` the mask keeps exactly ``floor(d_f * N)`` weights (``N``: all
prunable weights, or each layer's with ``scope='layerwise'``), counted exactly as in IMP.

Steps are written as in the rest of lottery: ``prune_start`` is ``t0`` (default ``'2ep'``),
``prune_end`` the last pruning step (default: 75% of the training length), ``prune_every`` is ``dt``
(default ``'100it'``). ``n = floor((prune_end - t0) / dt)``: when ``prune_end - t0`` is not a multiple
of ``dt`` the last pruning step is ``t0 + n * dt``, the last multiple of ``dt`` before ``prune_end``.

Masks are hard masks of :mod:`lottery.masking` (``attach_hard_mask``): pruned weights are exactly 0,
get zero gradients, and their optimizer state (momentum, Adam moments) is zeroed when they are pruned,
so no optimizer can move them again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from torch import nn

from lottery import masking
from lottery.engine import Callback, Trainer
from lottery.errors import ConfigError
from lottery.hparams import Hparams, TrainingHparams
from lottery.masks import Mask
from lottery.methods.imp import SCOPES, kept_count, one_shot_magnitude
from lottery.step import Step, parse_step_spec

__all__ = [
    "GMPHparams",
    "GMPPruningCallback",
    "GMPSchedule",
    "attach_gmp_masks",
    "gmp_density",
    "gmp_schedule",
    "prune_to_density",
]

#: Where the pruning ends when ``prune_end`` is not given: this fraction of the training length.
DEFAULT_END_FRACTION = 0.75


@dataclass(frozen=True)
class GMPHparams(Hparams):
    """Gradual magnitude pruning to ``density`` during one training run."""

    density: float = 0.1  # d_f, the final density (1 - s_f)
    initial_density: float = 1.0  # d_i (1 - s_i)
    prune_start: str = "2ep"  # t0
    prune_end: str | None = None  # t0 + n * dt (rounded down to a multiple of dt); None: 75% of training
    prune_every: str = "100it"  # dt
    scope: str = "global"

    _prefix = "gmp"
    _help = {
        "density": "final density: fraction of the prunable weights kept (floor(density x count))",
        "initial_density": "density of the first pruning step at prune-start (1: nothing pruned there)",
        "prune_start": "t0: first pruning step, e.g. 2ep; nothing is pruned before",
        "prune_end": "last pruning step t0 + n*dt, where the final density is reached "
                     "(default: 75%% of the training length)",
        "prune_every": "dt: prune every this many steps, e.g. 100it",
        "scope": "global (one magnitude ranking over all layers) or layerwise (each layer to the density)",
    }

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("density", "initial_density"):
            d = getattr(self, name)
            if not isinstance(d, (int, float)) or isinstance(d, bool) or not (0 < d <= 1):
                raise ConfigError(f"GMPHparams.{name} must be in (0, 1], got {d!r}")
        if self.density > self.initial_density:
            raise ConfigError(f"GMPHparams.density ({self.density}) must not exceed initial_density "
                              f"({self.initial_density}): pruning only removes weights")
        self._step("prune_start", "prune_every")
        if self.prune_end is not None:
            self._step("prune_end")
        if parse_step_spec(self.prune_every) == (0, 0):
            raise ConfigError("GMPHparams.prune_every must be positive, e.g. '100it'")
        self._choice("scope", SCOPES)


# -- the schedule, as pure functions ----------------------------------------------------------------
def gmp_density(t: int, t0: int, n: int, dt: int, final_density: float, initial_density: float = 1.0) -> float:
    """The density the schedule asks for at iteration ``t``.

    ``initial_density`` before ``t0`` (nothing pruned yet), ``d_f + (d_i - d_f) (1 - (t - t0)/(n dt))^3``
    in between, exactly ``final_density`` from ``t0 + n * dt`` on (also for ``n = 0``: one-shot at ``t0``).
    """
    if t < t0:
        return float(initial_density)
    span = n * dt
    if span <= 0 or t >= t0 + span:
        return float(final_density)
    progress = (t - t0) / span
    return float(final_density) + (float(initial_density) - float(final_density)) * (1.0 - progress) ** 3


@dataclass(frozen=True)
class GMPSchedule:
    """A GMP schedule in iterations: pruning at ``t0 + j * dt`` for ``j = 0..n``."""

    t0: int
    n: int
    dt: int
    final_density: float
    initial_density: float = 1.0

    def __post_init__(self) -> None:
        if self.t0 < 0 or self.n < 0 or self.dt <= 0:
            raise ConfigError(f"invalid GMP schedule t0={self.t0}, n={self.n}, dt={self.dt}")

    @property
    def end(self) -> int:
        """The last pruning step ``t0 + n * dt``, where the final density is reached."""
        return self.t0 + self.n * self.dt

    def steps(self) -> list[int]:
        """The iterations at which the network is pruned."""
        return [self.t0 + j * self.dt for j in range(self.n + 1)]

    def is_pruning_step(self, t: int) -> bool:
        return self.t0 <= t <= self.end and (t - self.t0) % self.dt == 0

    def density(self, t: int) -> float:
        return gmp_density(t, self.t0, self.n, self.dt, self.final_density, self.initial_density)


def gmp_schedule(hp: GMPHparams, training: TrainingHparams, iterations_per_epoch: int) -> GMPSchedule:
    """The schedule of ``hp`` for a training recipe (``prune_end`` default: 75% of its length)."""
    total = Step.parse(training.training_steps, iterations_per_epoch).iteration
    t0 = Step.parse(hp.prune_start, iterations_per_epoch).iteration
    dt = Step.parse(hp.prune_every, iterations_per_epoch).iteration
    if hp.prune_end is None:
        end = math.floor(DEFAULT_END_FRACTION * total)
        end_text = f"75% of the training length ({end} iterations)"
    else:
        end = Step.parse(hp.prune_end, iterations_per_epoch).iteration
        end_text = f"prune_end {hp.prune_end} ({end} iterations)"
    if t0 > total:
        raise ConfigError(f"GMPHparams.prune_start {hp.prune_start} ({t0} iterations) is after the end of training "
                          f"({training.training_steps}, {total} iterations)")
    if end < t0:
        raise ConfigError(f"GMP: {end_text} is before prune_start {hp.prune_start} ({t0} iterations)")
    if end > total:
        raise ConfigError(f"GMP: {end_text} is after the end of training ({training.training_steps}, {total} iterations)")
    return GMPSchedule(t0=t0, n=(end - t0) // dt, dt=dt, final_density=hp.density, initial_density=hp.initial_density)


# -- pruning ------------------------------------------------------------------------------------------
def prune_to_density(weights, current: Mask, density: float, scope: str = "global") -> Mask:
    """``current`` pruned by magnitude down to ``density`` (of all of its entries, or of each layer's);
    ``current`` itself when it keeps no more than that already. Pruned weights stay pruned."""
    if scope == "global":
        if kept_count(density, current.num_total()) >= current.num_kept():
            return current
    elif all(kept_count(density, m.numel()) >= int(m.sum()) for m in current.values()):
        return current
    return one_shot_magnitude(weights, density, scope, current=current)


def attach_gmp_masks(model: nn.Module, names: Iterable[str]) -> Mask:
    """All-ones hard masks on ``names`` (before training: the checkpoints then always hold the masks,
    so a resumed run loads the mask it had reached)."""
    mask = Mask.ones(model, list(names))
    masking.attach_hard_mask(model, mask)
    return mask


class GMPPruningCallback(Callback):
    """Prunes the hard-masked ``names`` of the trainer's model to the schedule's density at each of its
    pruning steps (after the optimizer step that reaches the iteration; at the start of training for
    ``t0 = 0``). Pruning again at the same step is a no-op, so a resumed run is unaffected.

    The model must carry hard masks on ``names`` before training (:func:`attach_gmp_masks`).
    """

    def __init__(self, schedule: GMPSchedule, names: Sequence[str], scope: str = "global"):
        if scope not in SCOPES:
            raise ConfigError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        self.schedule = schedule
        self.names = list(names)
        self.scope = scope
        self.events: list[tuple[int, float, int]] = []  # (iteration, density asked, weights kept)

    def _current(self, model: nn.Module) -> Mask:
        mask = masking.current_mask(model)
        missing = [n for n in self.names if n not in mask]
        if missing:
            raise ConfigError(f"GMP: no hard mask on {', '.join(missing[:5])}; call attach_gmp_masks(model, names) "
                              "before training")
        return Mask({n: mask[n] for n in self.names})

    def _prune(self, trainer: Trainer) -> None:
        t = trainer.iteration
        model = trainer.model
        current = self._current(model)
        density = self.schedule.density(t)
        params = masking.logical_named_parameters(model)
        new = prune_to_density({n: params[n] for n in self.names}, current, density, self.scope)
        if new is not current:
            masking.attach_hard_mask(model, new)
            # momentum / Adam moments of newly pruned entries would move them again
            masking.zero_pruned_optimizer_state_(model, trainer.optimizers)
        self.events.append((t, density, new.num_kept()))

    def on_fit_start(self, trainer: Trainer) -> None:
        self._current(trainer.model)
        if self.schedule.is_pruning_step(trainer.iteration):
            self._prune(trainer)

    def on_step_end(self, trainer: Trainer) -> None:
        if self.schedule.is_pruning_step(trainer.iteration):
            self._prune(trainer)

    def on_evaluate(self, trainer: Trainer, row: dict[str, Any]) -> None:
        row["density"] = self._current(trainer.model).density()
        row["target_density"] = self.schedule.density(trainer.iteration)
