"""Has a CS mask become binary? Measured at the end of every search round (docs/methods.md, docs/cs.md).

CS ends each round with the hard mask ``1[s > 0]``, which is only the network that was trained if the
soft mask ``sigmoid(beta_final * s)`` has reached 0 or 1 everywhere. When the logits barely moved
(short rounds, tiny gradients) many entries sit near ``s = 0``: the soft network still uses a fraction
of every "pruned" weight and the hard network is a different, worse one, while the search's own
accuracy looks fine. Three figures say whether that happened:

* **undecided fraction**: logits with ``|beta_final * s| < UNDECIDED_LOGIT`` (``ln 99``: the sigmoid is
  more than 1 % away from both 0 and 1), per layer and over all masked weights;
* **soft against hard accuracy**: the network evaluated with the soft masks at ``beta_final`` and with
  their limit ``1[s > 0]`` (:func:`lottery.masking.hardened_soft_masks`), on the validation split;
* **flips**: mask entries whose hard value changed since the previous round's end (round 0: since the
  start, ``1[s0 > 0]``).

A round *converged* when at most ``MAX_UNDECIDED`` of the logits are undecided and the hard network is
at most ``MAX_ACCURACY_GAP`` below (or above) the soft one, or one example of the validation split where
that is more (0.3 points is under one example on fewer than 334 images).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lottery import masking
from lottery.masks import Mask

UNDECIDED_LOGIT = math.log(99.0)  # |beta * s| below this: sigmoid(beta * s) within (0.01, 0.99)
MAX_UNDECIDED = 0.01  # at most 1 % of the logits undecided
MAX_ACCURACY_GAP = 0.003  # soft and hard validation accuracy within 0.3 points


@torch.no_grad()
def undecided_fractions(model: nn.Module, beta: float, threshold: float = UNDECIDED_LOGIT) -> dict[str, Any]:
    """``{"overall": f, "per_layer": {name: f}}``: the fraction of logits with ``|beta * s| < threshold``."""
    per_layer: dict[str, float] = {}
    undecided = total = 0
    for name, s in masking.mask_logits(model).items():
        u = int(((float(beta) * s.detach().double()).abs() < threshold).sum())
        per_layer[name] = u / s.numel()
        undecided += u
        total += s.numel()
    return {"overall": undecided / total if total else 0.0, "per_layer": per_layer}


def mask_flips(before: Mask, after: Mask) -> int:
    """The number of entries whose hard value differs between two masks of the same weights."""
    return int(sum(int((before[name] != after[name]).sum()) for name in after))


def soft_and_hard_accuracy(model: nn.Module, loader, device, beta: float) -> tuple[float, float, int]:
    """Top-1 accuracy of the soft network at temperature ``beta`` and of its hard limit ``1[s > 0]``, and
    the number of examples."""
    from lottery.engine import evaluate

    before = masking.get_temperature(model)
    masking.set_temperature(model, beta)
    try:
        soft = evaluate(model, loader, device)
        with masking.hardened_soft_masks(model):
            hard = evaluate(model, loader, device)
    finally:
        if before is not None:
            masking.set_temperature(model, before)
    return float(soft["top1"]), float(hard["top1"]), int(soft["count"])


def round_convergence(model: nn.Module, loader, device, beta_final: float, previous: Mask,
                      accuracies: tuple[float, float, int] | None = None) -> dict[str, Any]:
    """All figures of one round's end (see the module docstring), JSON-ready. ``accuracies``: the soft and
    hard accuracy and example count when already measured (a stack of searches measures every member's
    in one pass); otherwise measured here on ``loader``."""
    und = undecided_fractions(model, beta_final)
    soft, hard, count = accuracies if accuracies is not None else soft_and_hard_accuracy(model, loader, device,
                                                                                        beta_final)
    mask = masking.hard_mask_from_logits(model)
    gap = soft - hard
    gap_limit = gap_limit_for(count)
    return {
        "undecided": und["overall"],
        "undecided_per_layer": und["per_layer"],
        "undecided_threshold": UNDECIDED_LOGIT,
        "soft_val_accuracy": soft,
        "hard_val_accuracy": hard,
        "soft_hard_gap": gap,
        "soft_hard_gap_limit": gap_limit,
        "val_examples": count,
        "flips": mask_flips(previous, mask),
        "density": mask.density(),
        "converged": is_converged(und["overall"], gap, gap_limit),
    }


def gap_limit_for(examples: int) -> float:
    """MAX_ACCURACY_GAP, or one example of a small validation split (a smaller gap cannot be seen there)."""
    return max(MAX_ACCURACY_GAP, 1.0 / examples + 1e-12) if examples > 0 else MAX_ACCURACY_GAP


def is_converged(undecided: float, gap: float, gap_limit: float = MAX_ACCURACY_GAP) -> bool:
    return undecided <= MAX_UNDECIDED and abs(gap) <= gap_limit


def describe(conv: dict[str, Any], round_index: int, rounds: int) -> str:
    """One log line for a round's convergence figures."""
    return (f"cs round {round_index + 1}/{rounds} mask: density {conv['density']:.4g}, "
            f"{100 * conv['undecided']:.2f} % of logits undecided (|beta*s| < {conv['undecided_threshold']:.2f}), "
            f"val accuracy soft {100 * conv['soft_val_accuracy']:.2f} % / hard {100 * conv['hard_val_accuracy']:.2f} %, "
            f"{conv['flips']} entries flipped since the {'start' if round_index == 0 else 'previous round'}")


def not_converged_message(conv: dict[str, Any], round_index: int, default_recipe: bool = True) -> str:
    """One line naming the criteria the round failed and what to change."""
    failed = []
    if conv["undecided"] > MAX_UNDECIDED:
        failed.append(f"{100 * conv['undecided']:.2f} % of logits undecided (limit {100 * MAX_UNDECIDED:g} %)")
    limit = conv.get("soft_hard_gap_limit", MAX_ACCURACY_GAP)
    if abs(conv["soft_hard_gap"]) > limit:
        failed.append(f"hard-mask val accuracy {100 * conv['hard_val_accuracy']:.2f} % against soft "
                      f"{100 * conv['soft_val_accuracy']:.2f} % (limit {_points(100 * limit)} apart)")
    # With the paper's recipe an unconverged search can still give a good ticket (the ticket is retrained
    # from the rewind point: ResNet-20 in benchmarks/RESULTS.md), so the advice says what it matters for.
    fix = ("use longer rounds or a larger --beta-final" if default_recipe else
           "for a pruned network, use lottery's default recipe (--mask-optimizer adam --temperature-schedule "
           "iteration), longer rounds or a larger --beta-final; a ticket, retrained from the rewind point, can "
           "still be good (docs/cs.md)")
    return (f"the CS mask did not converge in round {round_index + 1}: {' and '.join(failed)}; the hard mask is "
            f"not the network that was trained. To fix: {fix}")


def _points(value: float) -> str:
    """``value`` percentage points in words: "1 point", "0.3 points"."""
    shown = f"{value:.2g}"
    return f"{shown} point" if shown == "1" else f"{shown} points"
