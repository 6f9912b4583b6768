"""Iterative magnitude pruning (IMP) and its relatives, as small stateless functions (open_lth's design);
docs/methods.md states each variant.

A pruning strategy takes weights and the current mask and returns a new mask; it never trains, never
reads files and never changes its inputs. The experiment layer (:mod:`lottery.pipelines.imp`) decides
which weights are pruned from (a ticket's trained weights, a continued run's, ...) and what is trained
afterwards.

Counting is exact. ``rate`` and ``density`` are taken as the decimal numbers they are written as, so
pruning 7% of 100 remaining weights removes ``ceil(0.07 * 100) = 7`` of them, not the 8 that
``math.ceil(0.07 * 100)`` gives in floating point (``0.07 * 100 == 7.000000000000001``).

Ties are broken deterministically: the weights are ranked by ``|w|`` with a stable sort over the
concatenation of the layers in the mask's order (each layer flattened in row-major order), so among
equal magnitudes the one that comes first is removed first. A removed weight never returns: only the
weights the current mask keeps are candidates, whatever their magnitude.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Mapping

import torch
from torch import nn

from lottery import masking
from lottery.errors import ConfigError
from lottery.hparams import Hparams
from lottery.masks import Mask
from lottery.step import parse_step_spec

SCOPES = ("global", "layerwise")

__all__ = [
    "FinetuneHparams",
    "IMPHparams",
    "LRRHparams",
    "OneShotHparams",
    "RandomPruneHparams",
    "RandomReinitHparams",
    "derived_seed",
    "magnitude_prune",
    "one_shot_magnitude",
    "prune_count",
    "random_prune",
    "random_reinit",
]


# -- hparams ---------------------------------------------------------------------------------------
class _LevelsMixin:
    """Validation shared by the iterative methods: ``levels``, ``rate``, ``scope``."""

    def _check_levels(self) -> None:
        self._check_types()  # type: ignore[attr-defined]
        levels = getattr(self, "levels")
        if not isinstance(levels, int) or isinstance(levels, bool) or levels < 0:
            raise ConfigError(f"{type(self).__name__}.levels must be a non-negative integer, got {levels!r}")
        rate = getattr(self, "rate")
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not (0 < rate < 1):
            raise ConfigError(f"{type(self).__name__}.rate must be a fraction strictly between 0 and 1, got {rate!r}")
        self._choice("scope", SCOPES)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class IMPHparams(_LevelsMixin, Hparams):
    """Iterative magnitude pruning with rewinding (IMP / IMP-R) or continued training (IMP-C).

    ``levels`` is not part of a run's identity: asking for more levels later continues the same run
    folder (the pipelines leave it out of the folder hash).
    """

    levels: int = 10
    rate: float = 0.2
    scope: str = "global"
    rewind: str = "0it"  # k: '0it' is the original lottery-ticket procedure, later points IMP-R
    variant: str = "rewind"  # rewind: retrain every level from k; continue: IMP-C (no rewinding between levels)

    _prefix = "imp"
    _help = {
        "levels": "pruning levels after the dense level 0 (density about (1-rate)^levels)",
        "rate": "fraction of the remaining prunable weights removed per level",
        "scope": "global (one magnitude ranking over all layers) or layerwise (rate per layer)",
        "rewind": "rewind point k, e.g. 0it (original LTH), 500it or 1ep (IMP-R)",
        "variant": "rewind: retrain each level from k; continue: keep training the level's weights (IMP-C)",
    }

    def __post_init__(self) -> None:
        self._check_levels()
        self._step("rewind")
        self._choice("variant", ("rewind", "continue"))


@dataclass(frozen=True)
class LRRHparams(_LevelsMixin, Hparams):
    """Learning-rate rewinding (Renda et al. 2020): keep the final weights, replay the LR schedule from k."""

    levels: int = 10
    rate: float = 0.2
    scope: str = "global"
    rewind: str = "0it"  # the schedule is replayed from this step to the end: retraining lasts T - k

    _prefix = "lrr"
    _help = {
        "levels": "pruning levels after the dense level 0",
        "rate": "fraction of the remaining prunable weights removed per level",
        "scope": "global or layerwise magnitude ranking",
        "rewind": "replay the LR schedule from this step (retraining lasts T - k)",
    }

    def __post_init__(self) -> None:
        self._check_levels()
        self._step("rewind")


@dataclass(frozen=True)
class FinetuneHparams(_LevelsMixin, Hparams):
    """Fine-tuning after each pruning step: keep the final weights, train at the recipe's final LR."""

    levels: int = 10
    rate: float = 0.2
    scope: str = "global"
    finetune_steps: str | None = None  # None: as long as the training recipe

    _prefix = "finetune"
    _help = {
        "levels": "pruning levels after the dense level 0",
        "rate": "fraction of the remaining prunable weights removed per level",
        "scope": "global or layerwise magnitude ranking",
        "finetune_steps": "fine-tuning length per level at the final LR (default: the training length)",
    }

    def __post_init__(self) -> None:
        self._check_levels()
        if self.finetune_steps is not None:
            self._step("finetune_steps")
            if parse_step_spec(self.finetune_steps) == (0, 0):
                raise ConfigError("FinetuneHparams.finetune_steps must be positive, e.g. '10ep'")


@dataclass(frozen=True)
class OneShotHparams(Hparams):
    """One-shot magnitude pruning of a trained dense network to ``density``, optionally fine-tuned."""

    density: float = 0.1
    scope: str = "global"
    finetune_steps: str = "0ep"  # at the recipe's final LR

    _prefix = "oneshot"
    _help = {
        "density": "fraction of the prunable weights kept (floor(density x count))",
        "scope": "global or layerwise magnitude ranking",
        "finetune_steps": "fine-tune the pruned network this long at the final LR (0ep: none)",
    }

    def __post_init__(self) -> None:
        self._check_types()
        d = self.density
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not (0 < d <= 1):
            raise ConfigError(f"OneShotHparams.density must be in (0, 1], got {d!r}")
        self._choice("scope", SCOPES)
        self._step("finetune_steps")


@dataclass(frozen=True)
class RandomPruneHparams(Hparams):
    """Control: a random mask with the same per-layer (layerwise) or total (global) count as a level's."""

    level: int = 1
    seed: int = 1
    scope: str = "layerwise"

    _prefix = "random_prune"
    _help = {
        "level": "the IMP level whose mask sets the counts (and whose rewind state is retrained)",
        "seed": "seed of the random mask",
        "scope": "layerwise (each layer keeps its kept count) or global (only the total count)",
    }

    def __post_init__(self) -> None:
        _check_level(self)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"RandomPruneHparams.seed must be an integer, got {self.seed!r}")
        self._choice("scope", SCOPES)


@dataclass(frozen=True)
class RandomReinitHparams(Hparams):
    """Control: a level's mask on freshly drawn random weights (same distribution as the model's init)."""

    level: int = 1
    seed: int = 1

    _prefix = "random_reinit"
    _help = {
        "level": "the IMP level whose mask is kept",
        "seed": "seed of the new random weights",
    }

    def __post_init__(self) -> None:
        _check_level(self)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"RandomReinitHparams.seed must be an integer, got {self.seed!r}")


def _check_level(hp: Hparams) -> None:
    level = getattr(hp, "level")
    if not isinstance(level, int) or isinstance(level, bool) or level < 0:
        raise ConfigError(f"{type(hp).__name__}.level must be a non-negative integer, got {level!r}")


# -- counting ---------------------------------------------------------------------------------------
def _exact(x: float | Fraction) -> Fraction:
    """The decimal number a float is written as (``0.2`` -> 1/5), so products with counts are exact."""
    if isinstance(x, Fraction):
        return x
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ConfigError(f"expected a finite number, got {x!r}")
    return Fraction(repr(float(x)))


def prune_count(rate: float, remaining: int) -> int:
    """``ceil(rate * remaining)`` computed exactly: how many of ``remaining`` weights one level removes."""
    return min(remaining, math.ceil(_exact(rate) * remaining))


def kept_count(density: float, total: int) -> int:
    """``floor(density * total)`` computed exactly: how many weights a target density keeps."""
    return math.floor(_exact(density) * total)


# -- magnitude pruning ------------------------------------------------------------------------------
def _check_weights(weights: Mapping[str, torch.Tensor], mask: Mask) -> None:
    missing = [n for n in mask if n not in weights]
    if missing:
        raise ConfigError(f"no weights given for masked tensor(s) {', '.join(missing[:10])}")
    bad = [f"{n}: weights {tuple(weights[n].shape)}, mask {tuple(m.shape)}"
           for n, m in mask.items() if tuple(weights[n].shape) != tuple(m.shape)]
    if bad:
        raise ConfigError(f"weights and mask disagree in shape: {'; '.join(bad[:10])}")


def _remove_smallest(scores: list[torch.Tensor], keep: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """New keep-flags with the ``n`` smallest-scoring kept entries removed (stable ranking, see module doc)."""
    flat_keep = torch.cat([k.reshape(-1) for k in keep]) if keep else torch.zeros(0, dtype=torch.bool)
    if n <= 0:
        return [k.clone() for k in keep]
    flat_scores = torch.cat([s.reshape(-1) for s in scores])
    candidates = flat_keep.nonzero().squeeze(1)
    order = torch.sort(flat_scores[candidates], stable=True).indices
    new_flat = flat_keep.clone()
    new_flat[candidates[order[:n]]] = False
    out, offset = [], 0
    for k in keep:
        out.append(new_flat[offset: offset + k.numel()].reshape(k.shape))
        offset += k.numel()
    return out


def _magnitudes(weights: Mapping[str, torch.Tensor], names) -> list[torch.Tensor]:
    # float64 on the CPU: the ranking must not depend on the device or on float16 weights
    return [weights[n].detach().to("cpu", torch.float64).abs() for n in names]


def _prune_to_counts(weights, current: Mask, remove: int | dict[str, int], scope: str) -> Mask:
    names = list(current)
    keep = [current[n].cpu() for n in names]
    scores = _magnitudes(weights, names)
    if scope == "global":
        new = _remove_smallest(scores, keep, int(remove))  # type: ignore[arg-type]
    else:
        new = [_remove_smallest([s], [k], remove[n])[0] for n, s, k in zip(names, scores, keep)]  # type: ignore[index]
    return Mask(dict(zip(names, new)))


def magnitude_prune(
    weights: Mapping[str, torch.Tensor], current: Mask, rate: float = 0.2, scope: str = "global"
) -> Mask:
    """One IMP level: remove ``ceil(rate * remaining)`` of the weights ``current`` keeps, smallest ``|w|`` first.

    ``scope='global'`` ranks all layers' kept weights together; ``'layerwise'`` removes
    ``ceil(rate * remaining_in_layer)`` in each layer. Only the names of ``current`` are pruned (ignored
    weights are simply not in the mask); the result keeps a subset of what ``current`` keeps.
    """
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if not (0 < _exact(rate) < 1):
        raise ConfigError(f"rate must be strictly between 0 and 1, got {rate!r}")
    _check_weights(weights, current)
    if scope == "global":
        return _prune_to_counts(weights, current, prune_count(rate, current.num_kept()), scope)
    counts = {n: prune_count(rate, int(m.sum())) for n, m in current.items()}
    return _prune_to_counts(weights, current, counts, scope)


def one_shot_magnitude(
    weights: Mapping[str, torch.Tensor],
    density: float,
    scope: str = "global",
    names=None,
    current: Mask | None = None,
) -> Mask:
    """Keep the ``floor(density * n)`` largest ``|w|`` in one step (``n``: all prunable weights, or each
    layer's with ``scope='layerwise'``).

    The weights pruned are those named by ``current`` (default: all ones over ``names``, default every key
    of ``weights``); ``current`` may already prune some, which then stay pruned.
    """
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if not (0 < _exact(density) <= 1):
        raise ConfigError(f"density must be in (0, 1], got {density!r}")
    if current is None:
        current = Mask.ones({n: weights[n] for n in (names if names is not None else weights)})
    _check_weights(weights, current)
    if scope == "global":
        target = kept_count(density, current.num_total())
        if target > current.num_kept():
            raise ConfigError(f"density {density} keeps {target} weights but the current mask keeps only "
                              f"{current.num_kept()}")
        return _prune_to_counts(weights, current, current.num_kept() - target, scope)
    counts = {}
    for n, m in current.items():
        target = kept_count(density, m.numel())
        if target > int(m.sum()):
            raise ConfigError(f"density {density} keeps {target} weights of {n} but the current mask keeps only "
                              f"{int(m.sum())}")
        counts[n] = int(m.sum()) - target
    return _prune_to_counts(weights, current, counts, scope)


# -- controls ---------------------------------------------------------------------------------------
def derived_seed(seed: int, tag: str) -> int:
    """A 63-bit seed for ``(seed, tag)``: independent streams for the same user seed.

    Used so that, e.g., re-initialising with seed 0 never reproduces a network built with seed 0.
    """
    digest = hashlib.sha256(f"lottery:{tag}:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _shapes(mask_or_shapes: Mask | Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    out = {}
    for n, v in mask_or_shapes.items():
        if isinstance(v, torch.Tensor):
            out[n] = tuple(v.shape)
        else:
            out[n] = tuple(int(d) for d in v)
    return out


def random_prune(
    mask_or_shapes: Mask | Mapping[str, Any],
    density: float | None = None,
    *,
    like: Mask | None = None,
    scope: str = "layerwise",
    seed: int = 0,
) -> Mask:
    """A uniformly random mask over the names/shapes of ``mask_or_shapes``; the same for the same seed.

    How many are kept: with ``like`` (a reference mask, default ``mask_or_shapes`` itself when it is a Mask
    and no ``density`` is given), ``layerwise`` keeps exactly each layer's kept count of ``like`` and
    ``global`` only its total count, spread uniformly over all layers. With ``density``, ``layerwise`` keeps
    ``floor(density * layer size)`` per layer and ``global`` ``floor(density * total)``.
    """
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if density is not None and like is not None:
        raise ConfigError("random_prune takes either density or like, not both")
    shapes = _shapes(mask_or_shapes)
    if density is None and like is None:
        if not isinstance(mask_or_shapes, Mask):
            raise ConfigError("random_prune needs a density, or a reference mask (like=...)")
        like = mask_or_shapes
    if like is not None:
        if _shapes(like) != shapes:
            raise ConfigError("random_prune: the reference mask has other names or shapes")
        per_layer = {n: int(like[n].sum()) for n in shapes}
        total = like.num_kept()
    else:
        if not (0 <= _exact(density) <= 1):  # type: ignore[arg-type]
            raise ConfigError(f"density must be in [0, 1], got {density!r}")
        per_layer = {n: kept_count(density, math.prod(s)) for n, s in shapes.items()}  # type: ignore[arg-type]
        total = kept_count(density, sum(math.prod(s) for s in shapes.values()))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(derived_seed(seed, "random-prune"))
    if scope == "layerwise":
        out = {}
        for n, s in shapes.items():
            flat = torch.zeros(math.prod(s), dtype=torch.bool)
            flat[torch.randperm(flat.numel(), generator=g)[: per_layer[n]]] = True
            out[n] = flat.reshape(s)
        return Mask(out)
    sizes = [math.prod(s) for s in shapes.values()]
    flat = torch.zeros(sum(sizes), dtype=torch.bool)
    flat[torch.randperm(flat.numel(), generator=g)[:total]] = True
    out, offset = {}, 0
    for (n, s), size in zip(shapes.items(), sizes):
        out[n] = flat[offset: offset + size].reshape(s)
        offset += size
    return Mask(out)


def default_init(model: nn.Module) -> None:
    """Draw every parameter again as a freshly built registry model would: each module's
    ``reset_parameters`` (BatchNorm statistics reset too), then the models' shared ``init_weights``."""
    from lottery.models._common import init_weights

    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    init_weights(model)


@torch.no_grad()
def random_reinit(
    model: nn.Module, mask: Mask, seed: int, init: Callable[[nn.Module], None] | None = None
) -> nn.Module:
    """Control: replace ALL of ``model``'s parameters (and BN statistics) by a new random draw, then attach
    ``mask`` as a hard mask (pruned weights exactly 0). Returns ``model``.

    ``init(model)`` draws the weights (default :func:`default_init`: the distribution of lottery's models);
    it runs under a forked RNG seeded from ``seed`` (via :func:`derived_seed`, so the draw differs from the
    model's original initialisation with the same seed), leaving the global RNG as it was.
    """
    masking.remove_hard_mask(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, "random-reinit"))
        (init or default_init)(model)
    masking.attach_hard_mask(model, mask)
    return model
