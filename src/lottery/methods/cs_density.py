"""Target density for Continuous Sparsification: a per-round schedule and a projection of the logits
(docs/methods.md states the rule; docs/cs.md the measurements).

Why: the L0 penalty ``lam * sum(m)`` only says "fewer weights", not how many. Its weight ``lam`` is
tiny next to the task gradients and the density that comes out depends on ``s0``, ``lam``, the round
length and the network, so a user cannot ask for a density. With ``density=D`` CS keeps its own
decisions (which weights to keep is still the logits' learned order) but the *number* kept follows a
schedule that ends at ``D``:

* round ``r`` of ``R`` ends at density ``D ** ((r + 1) / R)`` (a geometric sequence, as IMP's levels:
  each round prunes the same fraction of what is left; the reset between rounds multiplies pruned
  logits by ``beta_final``, so they stay far below the cut);
* within a round the density moves geometrically from the round's starting density to that round's
  target over the first ``ramp`` fraction of the round's steps and then holds, so the logits have the
  rest of the round (while the temperature is highest) to move away from 0 and the mask to become
  binary;
* after every optimizer step all logits are shifted by one common amount so that exactly
  ``round(d_t * N)`` of the ``N`` logits are positive. A common shift keeps the logits' order, so the
  kept set is always the top of what CS learned; it is the exact projection onto the density
  constraint, the limit of a dual-ascent controller on ``lam`` with an infinite step size. Feedback
  controllers on ``lam`` were tried first and overshot: logits that drift below 0 at a low
  temperature barely feel it and do not come back, so the density ratchets past the target.

The shift is applied in place to the logits, outside autograd, after the optimizer step; the optimizer's
state is untouched (a common offset changes no gradient order).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lottery import masking
from lottery.engine import Callback
from lottery.errors import ConfigError
from lottery.methods.cs_convergence import UNDECIDED_LOGIT


def round_target_density(density: float, round_index: int, rounds: int) -> float:
    """The density at the end of round ``round_index`` (0-based) of ``rounds``: ``density ** ((r+1)/R)``."""
    if not 0 < density < 1:
        raise ConfigError(f"density must be in (0, 1), got {density}")
    return float(density) ** ((round_index + 1) / rounds)


def scheduled_density(start: float, end: float, step: int, round_steps: int, ramp: float) -> float:
    """Density wanted after ``step`` steps of a round: geometric from ``start`` to ``end`` over the first
    ``ramp * round_steps`` steps, then ``end``."""
    ramp_steps = max(1.0, ramp * round_steps)
    f = min(1.0, step / ramp_steps)
    if start <= 0 or f >= 1:
        return float(end)  # exactly: exp(log(end)) can differ from end in the last bit
    return math.exp((1 - f) * math.log(start) + f * math.log(end))


def tie_gap(beta_final: float) -> float:
    """How far apart a split block of tied logits is set (kept ones at ``+gap``, pruned ones at ``-gap``):
    twice the undecided threshold at the final temperature, so the split part counts as decided.

    Why: tied logits (weights of dead units or always-zero inputs get identical gradients) move together
    under any optimizer. Split at a tiny distance they re-tie at the next step (``tiny + x == x`` in
    floating point) and sit at the cut for the rest of the round, soft and hard masks disagreeing there.
    A gap survives identical updates, and the next projection's cut falls inside it."""
    return 2.0 * UNDECIDED_LOGIT / float(beta_final)


def keep_count(density: float, n: int) -> int:
    """How many of ``n`` logits a density asks to keep: rounded, and at least 1 and at most ``n - 1`` (a
    projection can neither keep all nor none)."""
    return min(n - 1, max(1, round(density * n)))


@torch.no_grad()
def project_to_density(model: nn.Module, keep: int, gap: float = 0.0) -> float | None:
    """Shift every soft mask's logits by one common amount so that exactly ``keep`` are positive.

    Returns the shift subtracted. Logits tied at the cut (all equal at the start; weights whose gradients
    are identical, e.g. inputs that are always 0) cannot be separated by a shift: then the tied value is
    moved to 0, the tied entries with the lowest indices (in the models' parameter order) are kept, as
    many as needed, at ``+gap`` and the other tied entries pruned at ``-gap`` (with ``gap=0``: kept at the
    smallest positive number, pruned at 0). They carry no learned preference, so any choice among them
    is as good; :func:`tie_gap` says why the gap. Returns None only when the logits are not finite.
    """
    logits = list(masking.mask_logits(model).values())
    if not logits:
        raise ConfigError("the model has no soft masks")
    flat = [s.detach().reshape(-1) for s in logits]
    n = sum(f.numel() for f in flat)
    if not 0 < keep < n:
        raise ConfigError(f"cannot keep {keep} of {n} logits: keep must be between 1 and {n - 1}")
    kept = int(sum(int((f > 0).sum()) for f in flat))
    # Only the logits next to the current cut (0) matter: the m positive ones to prune (or non-positive
    # ones to keep) and their neighbours across the new cut. They are looked for in a band next to 0 that
    # widens until it holds them, so a step costs a few passes over the logits instead of a ranking of
    # all N (a full kthvalue costs more than a LeNet-300-100 training step; one step moves the cut by a
    # handful of entries).
    m = abs(kept - keep)
    if kept > keep:  # prune the m smallest positive logits
        low = _nearest_to_cut(flat, m + 1, positive=True)
        if low is None:
            return None
        next_largest, kth_largest = low[m - 1], low[m]
    elif kept < keep:  # keep the m largest non-positive logits
        high = _nearest_to_cut(flat, m + 1, positive=False)
        if high is None:
            return None
        kth_largest, next_largest = high[m - 1], high[m]
    else:
        # The count is right. When the last kept and the first pruned logit are both within two gaps of
        # the cut, the cut is still moved to the middle between them: the two halves of a split tie move
        # together and would otherwise drift onto the cut. (Not further: at a round's start the kept
        # logits sit at s0 and the pruned ones far below, and a midpoint there would throw the kept
        # ones far from where their sigmoid has a gradient.)
        if gap <= 0:
            return 0.0
        low = _nearest_to_cut(flat, 1, positive=True, max_width=2 * gap)
        high = _nearest_to_cut(flat, 1, positive=False, max_width=2 * gap)
        if low is None or high is None:
            return 0.0
        kth_largest, next_largest = low[0], high[0]
    if not bool(kth_largest > next_largest):
        return _cut_through_tie(logits, flat, kth_largest, keep, gap)
    shift = (kth_largest + next_largest) / 2
    # the midpoint can round onto one of them in low precision: then cut just below the kept one
    if not bool(kth_largest - shift > 0) or bool(next_largest - shift > 0):
        shift = next_largest
    for s in logits:
        s.sub_(shift.to(s.dtype))
    return float(shift)


def _nearest_to_cut(flat: list[torch.Tensor], count: int, positive: bool,
                    max_width: float = math.inf) -> torch.Tensor | None:
    """The ``count`` positive logits nearest 0, ascending (``positive``), or the ``count`` largest
    non-positive ones, descending; None when that side has fewer finite ones within ``max_width`` of 0."""
    width = min(1e-3, max_width)
    while True:
        if positive:
            band = torch.cat([f[(f > 0) & (f <= width)] for f in flat])
        else:
            band = torch.cat([f[(f <= 0) & (f > -width)] for f in flat])
        if band.numel() >= count or width > 1e30 or width >= max_width:
            break
        width = min(width * 16, max_width)
    if band.numel() < count:  # only non-finite logits left on that side: nothing sensible to do
        return None
    return torch.topk(band, count, largest=not positive).values


def _cut_through_tie(logits: list[torch.Tensor], flat: list[torch.Tensor], tied: torch.Tensor, keep: int,
                     gap: float) -> float:
    """Shift so that the tied value sits exactly at 0, then keep the first tied entries (at ``+gap``) until
    ``keep`` are positive and prune the rest of the tie (at ``-gap``) (see :func:`project_to_density`)."""
    above = int(sum(int((f > tied).sum()) for f in flat))
    need = keep - above
    for s in logits:
        s.sub_(tied.to(s.dtype))
    for s in logits:
        # In logical (row-major) order whatever the memory layout: a channels_last logits tensor (conv nets
        # train so on the CPU, lottery.engine.trainer) is edited through a contiguous copy, written back.
        ordered = s.contiguous()
        view = ordered.view(-1)
        idx = (view == 0).nonzero().flatten()
        kept, pruned = idx[:max(need, 0)], idx[max(need, 0):]
        # kept: the smallest positive normal number without a gap (kept, barely)
        view[kept] = gap if gap > 0 else torch.finfo(s.dtype).tiny
        if gap > 0:
            view[pruned] = -gap
        if ordered.data_ptr() != s.data_ptr():
            s.copy_(ordered)
        need -= kept.numel()
    return float(tied)


def kept_count(model: nn.Module) -> int:
    return int(sum(int((s.detach() > 0).sum()) for s in masking.mask_logits(model).values()))


class DensityCallback(Callback):
    """Keeps the hard density of a CS search round on its schedule (see the module docstring).

    ``start_density``: the density at the round's start (1 for round 0, the previous round's end
    after that). Records ``shift`` (sum of the shifts applied in this round) for the run's report.
    """

    def __init__(self, density: float, round_index: int, rounds: int, start_density: float, ramp: float,
                 gap: float = 0.0):
        self.end_density = round_target_density(density, round_index, rounds)
        self.gap = float(gap)
        self.start_density = float(start_density)
        self.ramp = float(ramp)
        self.total_shift = 0.0
        self.projections = 0

    def target(self, step: int, round_steps: int) -> float:
        return scheduled_density(self.start_density, self.end_density, step, round_steps, self.ramp)

    def on_step_end(self, trainer) -> None:
        n = sum(s.numel() for s in masking.mask_logits(trainer.model).values())
        steps_done = trainer.iteration - trainer.start.iteration
        round_steps = trainer.end.iteration - trainer.start.iteration
        keep = keep_count(self.target(steps_done, round_steps), n)
        shift = project_to_density(trainer.model, keep, self.gap)
        if shift is not None:
            self.total_shift += shift
            self.projections += 1

    def on_evaluate(self, trainer, row) -> None:
        steps_done = trainer.iteration - trainer.start.iteration
        row["target_density"] = self.target(steps_done, trainer.end.iteration - trainer.start.iteration)

    def state_dict(self) -> dict:
        return {"total_shift": self.total_shift, "projections": self.projections, "start_density": self.start_density}

    def load_state_dict(self, state: dict) -> None:
        # a resumed round keeps the schedule it started with (the model's density has moved since)
        self.start_density = float(state.get("start_density", self.start_density))
        self.total_shift = float(state.get("total_shift", 0.0))
        self.projections = int(state.get("projections", 0))
