"""Continuous Sparsification (Savarese, Silva & Maire, NeurIPS 2020), as docs/methods.md states it.

Every prunable weight ``w`` gets a mask logit ``s`` (initialised to ``s0``); the network uses
``w * m`` with the soft mask ``m = sigmoid(beta * s) / sigmoid(s0)``. The loss adds
``lam * sum(m)``, a smooth stand-in for the L0 norm. The temperature ``beta`` grows from 1 to
``beta_final`` within each round, so the sigmoid hardens into a step function and the mask becomes
binary; the final mask is ``1[s > 0]``.

Between rounds the weights are NOT rewound, the LR schedule restarts, beta returns to 1 and the logits
are reset with ``s <- min(beta_final * s, s0)``: a logit that went negative stays pruned (its sigmoid
at beta = 1 of a large negative number is ~0), the rest start again at ``s0``. The reference code sets
beta to 1 *before* that reset and so really runs ``min(s, s0)``, letting nearly-pruned weights come
back; this module implements the paper's intent (docs/methods.md).

Two ways to use it: ``ContinuousSparsification`` inside your own training loop (a penalty call, a step
call and an epoch-end call; the ticket helpers of lottery.methods.ticket and the optimizer restarts of
lottery.engine.restart are imported here too, for one import line), or the callbacks below on lottery's
engine (pipelines/cs.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from lottery import masking
from lottery.engine import Callback, Trainer, make_optimizer
from lottery.engine.restart import reset_optimizer_state, restart_lr_schedule
from lottery.errors import ConfigError
from lottery.hparams import Hparams, TrainingHparams
from lottery.masks import Mask
from lottery.methods.cs_density import (
    DensityCallback, keep_count, project_to_density, round_target_density, scheduled_density, tie_gap,
)
from lottery.methods.ticket import RewindPoint, save_rewind_point, ticket_from
from lottery.parameters import PRUNABLE_TYPES, has_soft_mask, short_list, split_name
from lottery.step import validate_step_spec

__all__ = [  # the in-loop API (README.md, docs/tutorial.md) first
    "ContinuousSparsification", "RewindPoint", "save_rewind_point", "ticket_from", "reset_optimizer_state",
    "restart_lr_schedule", "CSHparams", "DENSITY_S0", "ADAM_LR_SCALE", "DEFAULT_LAM", "temperature", "mask_penalty",
    "harden_soft_masks", "TemperatureCallback", "PenaltyCallback", "SnapshotCallback",
    "GRADIENT_MASK_SAFE_OPTIMIZERS", "EnforceMaskCallback", "make_search_optimizers", "search_round_callbacks",
]


#: Initial logit with a target density: slightly positive, so that every weight starts kept (hard density 1)
#: and the density schedule can take it down from there.
DENSITY_S0 = 0.02
#: Adam logits (the budget-robust default): learning rate ``ADAM_LR_SCALE / sqrt(steps per round)``.
ADAM_LR_SCALE = 0.1
DEFAULT_LAM = 1e-8  # the paper's penalty weight


@dataclass(frozen=True)
class CSHparams(Hparams):
    """The hparams of a CS search.

    The defaults are lottery's budget-robust recipe: the mask logits have their own Adam optimizer at a
    constant learning rate ``0.1 / sqrt(steps per round)``, the temperature grows every iteration to
    ``beta_final = 4000``. It gives binary masks at any round length, from one epoch to the paper's 85
    (docs/cs.md: why). The paper's reference recipe is ``mask_optimizer="sgd"`` (the weights' learning
    rate and schedule, momentum 0.9, Nesterov), ``temperature_schedule="epoch"``, ``beta_final=200``: the
    ``cifar10_*`` presets set exactly that.
    """

    s0: float | None = None  # None: 0, or DENSITY_S0 with a target density
    lam: float = DEFAULT_LAM
    beta_final: float = 4000.0
    rounds: int = 3
    density: float | None = None  # target density of the final mask; None: steered by s0 and lam
    density_ramp: float = 0.6  # fraction of each round over which the density moves to the round's target
    scale_by_s0: bool = True
    penalty: str = "sum"  # sum: lam * sum(m) (the reference); mean: lam * sum(m) / number of masked weights
    temperature_schedule: str = "iteration"  # iteration: beta grows every step; epoch: once per epoch (reference)
    rewind: str = "2ep"  # the rewind point k, saved during round 0
    round_steps: str | None = None  # length of a search round; None: the training recipe's length
    round_milestones: tuple[str, ...] | None = None  # LR milestones within a round; None: the recipe's
    mask_optimizer: str = "adam"  # adam: own optimizer, constant LR (robust); sgd: the reference
    mask_lr: float | None = None  # None: adam 0.1/sqrt(steps per round); sgd the weights' learning rate
    mask_momentum: float = 0.9
    mask_nesterov: bool = True
    finetune_steps: str = "0ep"  # pruning mode: fine-tuning of the pruned network

    _prefix = "cs"
    _help = {
        "s0": "initial mask logit (default 0, or 0.02 with --density); steers sparsity (larger: denser)",
        "lam": "penalty weight on the soft mask's sum (larger: sparser)",
        "beta_final": "temperature at the end of each round",
        "rounds": "number of search rounds",
        "density": "target density of the final mask, in (0, 1), e.g. 0.05 (default: none; s0 and lam steer)",
        "density_ramp": "with --density: fraction of each round over which the density moves to that round's target",
        "scale_by_s0": "divide the soft mask by sigmoid(s0) so it starts at exactly 1",
        "penalty": "sum (reference) or mean (normalised by the number of masked weights)",
        "temperature_schedule": "anneal beta every iteration (default) or once per epoch (reference)",
        "rewind": "rewind point k saved during round 0, e.g. 2ep or 500it",
        "round_steps": "length of one search round (default: the training length)",
        "round_milestones": "LR milestones within a round (default: the training recipe's)",
        "mask_optimizer": "adam (default: own Adam, constant LR 0.1/sqrt(steps per round)) or sgd (reference: the weights' LR and schedule)",
        "mask_lr": "learning rate of the mask logits (default: see --mask-optimizer)",
        "mask_momentum": "sgd: momentum of the mask logits",
        "mask_nesterov": "sgd: Nesterov momentum for the mask logits",
        "finetune_steps": "pruning mode: fine-tune the pruned network this long",
    }

    def __post_init__(self) -> None:
        self._check_types()
        if self.s0 is not None:
            self._finite("s0")
        self._non_negative("lam")
        self._fraction_below_one("mask_momentum")
        self._positive("beta_final")
        if self.beta_final < 1:
            raise ConfigError(f"CSHparams.beta_final must be >= 1 (beta starts at 1), got {self.beta_final}")
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or self.rounds < 1:
            raise ConfigError(f"CSHparams.rounds must be a positive integer, got {self.rounds!r}")
        if self.density is not None:
            self._finite("density")
            if not 0 < self.density < 1:
                raise ConfigError(f"CSHparams.density (--density) must be a fraction of the weights strictly between 0 and 1 "
                                  f"(e.g. 0.05 keeps 5 %), got {self.density!r}")
            if self.s0 is not None:
                raise ConfigError(f"CSHparams.density (--density) sets the initial logit itself; drop --s0 (got {self.s0!r}) or drop "
                                  "--density and steer the density with --s0 and --lam")
        self._finite("density_ramp")
        if not 0 < self.density_ramp <= 1:
            raise ConfigError(f"CSHparams.density_ramp must be in (0, 1], got {self.density_ramp!r}")
        self._choice("penalty", ("sum", "mean"))
        self._choice("temperature_schedule", ("epoch", "iteration"))
        self._choice("mask_optimizer", ("adam", "sgd"))
        self._step("rewind", "finetune_steps")
        if self.round_steps is not None:
            self._positive_step("round_steps")
        for m in self.round_milestones or ():
            validate_step_spec(m, "CSHparams.round_milestones")
        if self.mask_lr is not None:
            self._positive("mask_lr")
        if self.mask_nesterov and self.mask_momentum == 0:
            raise ConfigError("CSHparams.mask_nesterov needs mask_momentum > 0")

    @property
    def initial_logit(self) -> float:
        """``s0`` as used: the given value, else DENSITY_S0 with a target density, else 0."""
        if self.s0 is not None:
            return float(self.s0)
        return DENSITY_S0 if self.density is not None else 0.0

    def logit_lr(self, weights_lr: float, round_iterations: int) -> float:
        """The mask logits' learning rate for rounds of ``round_iterations`` steps.

        Adam moves each logit by about its learning rate per step; noisy (undecided) logits then spread
        like a random walk, ~ lr * sqrt(steps). ``0.1 / sqrt(steps)`` keeps that spread the same at any
        round length, so short rounds move the logits as far from 0 as long ones (measured in
        benchmarks/cs_budget.py)."""
        if self.mask_lr is not None:
            return float(self.mask_lr)
        if self.mask_optimizer == "adam":
            return ADAM_LR_SCALE / math.sqrt(max(1, round_iterations))
        return float(weights_lr)

    def round_recipe(self, training: TrainingHparams) -> TrainingHparams:
        """The training recipe of one search round."""
        changes: dict[str, Any] = {}
        if self.round_steps is not None:
            changes["training_steps"] = self.round_steps
        if self.round_milestones is not None:
            changes["milestones"] = tuple(self.round_milestones)
            if not self.round_milestones and training.schedule == "multistep":
                changes["schedule"] = "constant"
        return training.replace(**changes) if changes else training


# -- the math, as plain functions (tested against direct computations) ------------------------------
def temperature(progress_index: int, progress_total: int, beta_final: float) -> float:
    """``beta_final ** (e / (E - 1))``: 1 at the first epoch (or step) of a round, beta_final at the last."""
    if progress_total <= 1:
        return float(beta_final)
    return float(beta_final) ** (progress_index / (progress_total - 1))


def mask_penalty(model: nn.Module, lam: float, mode: str = "sum", reuse_forward: bool = False) -> torch.Tensor:
    """``lam * sum over layers of sum(m)`` (or divided by the number of masked weights for ``mean``).
    ``reuse_forward``: the masks of the forward pass just run (see masking.soft_mask_values)."""
    values = masking.soft_mask_values(model, reuse_forward)
    if not values:
        raise ConfigError("the model has no soft masks: attach them first (ContinuousSparsification does)")
    total = sum(v.sum() for v in values.values())
    if mode == "mean":
        total = total / sum(v.numel() for v in values.values())
    return lam * total


# -- use inside your own training loop --------------------------------------------------------------
class ContinuousSparsification:
    """CS inside any training loop: add ``penalty()`` to the loss, call ``step()`` after every optimizer
    step and ``epoch_end()`` after every epoch.

    Default (budget-robust) recipe: the mask logits get their own Adam optimizer at a constant learning
    rate ``0.1 / sqrt(steps per round)``, stepped by ``step()``, and the temperature grows every step to
    ``beta_final``; ``steps_per_epoch`` (``len(train_loader)``) is then required. ``density=D`` makes the
    final mask keep the fraction ``D`` of the weights (see lottery.methods.cs_density).

    ``mask_optimizer="sgd"`` is the paper's reference: the logits join ``optimizer`` (the user's, over
    the weights) as an extra parameter group with no weight decay and momentum ``mask_momentum``, so its
    learning rate and the user's LR scheduler apply to them too; without ``steps_per_epoch`` the
    temperature then grows once per epoch.

    At each round's end ``epoch_end()`` warns when the mask has not become binary or kept all or none of
    the weights; ``convergence(loader)`` gives the full figures (lottery.methods.cs_convergence).

    A new round starts with fresh optimizers and the LR schedule from its start in ``lottery search cs``;
    in your loop ``on_round_start(round_index)`` is called at the start of every round after the first
    (inside the ``epoch_end()`` that ends the previous one, which also returns ``new_round=True``) so that
    it can do the same: ``reset_optimizer_state(optimizer)`` and ``restart_lr_schedule(scheduler)``.

    Traps it refuses with a ``ConfigError``: wrapping a model that already carries soft masks (keep using
    its wrapper, or ``finish()`` it first), a model with nothing to mask, and any call but ``mask()``,
    ``density()``, ``finish()`` and ``plain_state_dict()`` after ``finish()``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        epochs_per_round: int,
        steps_per_epoch: int | None = None,
        rounds: int = 3,
        s0: float | None = None,
        lam: float = DEFAULT_LAM,
        beta_final: float = 4000.0,
        density: float | None = None,
        density_ramp: float = 0.6,
        penalty: str = "sum",
        scale_by_s0: bool = True,
        ignore: Sequence[str] | None = None,
        mask_optimizer: str = "adam",
        temperature_schedule: str | None = None,
        mask_lr: float | None = None,
        mask_momentum: float = 0.9,
        mask_nesterov: bool = True,
        on_round_start: Callable[[int], None] | None = None,
    ):
        if not isinstance(epochs_per_round, int) or isinstance(epochs_per_round, bool) or epochs_per_round < 1:
            raise ConfigError(f"epochs_per_round must be a positive integer, got {epochs_per_round!r}")
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise ConfigError(f"steps_per_epoch must be a positive integer (len(train_loader)), got {steps_per_epoch!r}")
        if temperature_schedule is None:
            temperature_schedule = "iteration" if steps_per_epoch is not None else "epoch"
        self.hp = CSHparams(s0=s0, lam=lam, beta_final=beta_final, rounds=rounds, density=density,
                            density_ramp=density_ramp, penalty=penalty, scale_by_s0=scale_by_s0,
                            temperature_schedule=temperature_schedule, mask_optimizer=mask_optimizer,
                            mask_lr=mask_lr, mask_momentum=mask_momentum, mask_nesterov=mask_nesterov)
        needs_steps = mask_optimizer == "adam" or temperature_schedule == "iteration" or density is not None
        if needs_steps and steps_per_epoch is None:
            raise ConfigError(
                "pass steps_per_epoch=len(train_loader): the default recipe (Adam logits, per-step temperature) and "
                "--density need the number of steps per round; or use mask_optimizer='sgd' (the paper's reference, "
                "per-epoch temperature) without a density"
            )
        if on_round_start is not None and not callable(on_round_start):
            raise ConfigError(f"on_round_start must be a function of the round index, got {on_round_start!r}")
        wrapped = list(masking.mask_logits(model))
        if wrapped:
            raise ConfigError(
                f"{type(model).__name__} already carries CS soft masks (on {short_list(wrapped, 5)}): it is already "
                "wrapped by a ContinuousSparsification (or masking.attach_soft_mask was called on it). Keep using "
                "that wrapper, or call its finish() (or lottery.masking.remove_soft_mask(model)) before wrapping the "
                "model again"
            )
        names = list(masking.prunable_weights(model, ignore=tuple(ignore or ())))
        if not names:
            kinds = "/".join(t.__name__ for t in PRUNABLE_TYPES)
            why = (f"ignore={list(ignore)!r} leaves out every one of them" if ignore and masking.prunable_weights(model)
                   else f"it has no {kinds} layer")
            raise ConfigError(f"{type(model).__name__} has nothing to mask: CS masks the weights of {kinds} layers "
                              f"(subclasses too), and {why}")
        self.model = model
        self.epochs_per_round = epochs_per_round
        self.steps_per_epoch = steps_per_epoch
        self.on_round_start = on_round_start
        self._finished: Mask | None = None  # the mask finish() returned
        self._finished_rescale: bool | None = None
        self.s0 = self.hp.initial_logit
        masking.attach_soft_mask(model, names, s0=self.s0, scale_by_s0=scale_by_s0)
        module_name, tensor_name = split_name(names[0])
        self._probe = (model.get_submodule(module_name), tensor_name)  # one masked weight: a cheap "still wrapped?"
        self.epoch = 0  # epochs completed, over all rounds
        self.step_in_round = 0
        self.round_start_mask = masking.hard_mask_from_logits(model)
        self.round_start_density = 1.0 if self.s0 > 0 else self.round_start_mask.density()
        self.optimizer = optimizer
        self.logit_optimizer: torch.optim.Optimizer | None = None
        self._logit_group: dict[str, Any] | None = None  # the group added to the user's optimizer (sgd)
        if mask_optimizer == "adam":
            self._new_logit_optimizer()
        elif optimizer is not None:
            if any("initial_lr" in g for g in optimizer.param_groups):
                import warnings

                warnings.warn("the optimizer already has an LR scheduler: build the scheduler after "
                              "ContinuousSparsification(mask_optimizer='sgd'), which adds a parameter group for the "
                              "mask logits that a scheduler built before does not know", RuntimeWarning, stacklevel=2)
            group = {"params": self.logits(), "weight_decay": 0.0}
            if mask_lr is not None:
                group["lr"] = mask_lr
            if isinstance(optimizer, torch.optim.SGD):
                group["momentum"] = mask_momentum
                group["nesterov"] = mask_nesterov
                group["dampening"] = 0.0
            optimizer.add_param_group(group)
            self._logit_group = optimizer.param_groups[-1]
        masking.set_temperature(model, self.beta)  # 1, or beta_final for one-step rounds (temperature())

    def _new_logit_optimizer(self) -> None:
        """A fresh Adam for the logits (each round starts a fresh one, as ``lottery search cs`` does)."""
        lr = self.hp.logit_lr(0.0, self.steps_per_round)
        self.logit_optimizer = torch.optim.Adam(self.logits(), lr=lr)

    @property
    def steps_per_round(self) -> int:
        return self.epochs_per_round * (self.steps_per_epoch or 1)

    @property
    def total_epochs(self) -> int:
        return self.hp.rounds * self.epochs_per_round

    @property
    def round(self) -> int:
        return min(self.epoch // self.epochs_per_round, self.hp.rounds - 1)

    @property
    def beta(self) -> float:
        if self.epoch >= self.total_epochs:  # after the last round: its final temperature
            return float(self.hp.beta_final)
        if self.hp.temperature_schedule == "iteration":
            return temperature(min(self.step_in_round, self.steps_per_round - 1), self.steps_per_round,
                               self.hp.beta_final)
        return temperature(self.epoch % self.epochs_per_round, self.epochs_per_round, self.hp.beta_final)

    def _check_active(self, call: str) -> None:
        """Refuse calls that need the soft masks once they are gone."""
        if self._finished is not None:
            raise ConfigError(
                f"cs.{call}() after cs.finish(): the search is over and the model is plain. cs.mask() and "
                "cs.density() still give the final mask; to retrain it as a ticket use ticket_from(model, rewind, "
                "mask, optimizer); to search again wrap the model in a new ContinuousSparsification"
            )
        if not has_soft_mask(*self._probe):
            raise ConfigError(
                f"cs.{call}(): the model's soft masks were removed outside this wrapper (remove_soft_mask / "
                "remove_masks); call cs.finish() instead, or wrap the model again"
            )

    def logits(self) -> list[nn.Parameter]:
        """The mask logits, for users who prefer their own separate optimizer."""
        self._check_active("logits")
        return list(masking.mask_logits(self.model).values())

    def penalty(self, reuse_forward: bool = False) -> torch.Tensor:
        """``lam * sum(m)``, to add to the loss. ``reuse_forward=True`` (faster) reuses the masks of the
        forward pass just run; only when this penalty is added to that pass's loss and backpropagated with
        it, as in ``loss = criterion(model(x), y) + cs.penalty(reuse_forward=True)``."""
        self._check_active("penalty")
        return mask_penalty(self.model, self.hp.lam, self.hp.penalty, reuse_forward)

    def step(self) -> None:
        """After every optimizer step: step the logits' own optimizer (default recipe), keep the density
        on its schedule (with ``density``) and advance a per-step temperature."""
        self._check_active("step")
        if self.logit_optimizer is not None:
            self.logit_optimizer.step()
            self.logit_optimizer.zero_grad(set_to_none=True)
        self.step_in_round += 1
        if self.hp.density is not None:
            end = round_target_density(self.hp.density, self.round, self.hp.rounds)
            wanted = scheduled_density(self.round_start_density, end, self.step_in_round, self.steps_per_round,
                                       self.hp.density_ramp)
            n = self.round_start_mask.num_total()
            project_to_density(self.model, keep_count(wanted, n), tie_gap(self.hp.beta_final))
        masking.set_temperature(self.model, self.beta)

    def density(self) -> float:
        """The density of the hard mask ``1[s > 0]`` (:meth:`mask`) as it is now. Before any training every
        logit is ``s0``, so it is 1.0 with ``s0 > 0`` (as with ``density=``, whose ``s0`` is 0.02) and 0.0 with
        ``s0 <= 0`` (the default without a density is ``s0 = 0``, and ``s = 0`` counts as pruned): the hard
        mask means something only once training has moved the logits. After :meth:`finish`, the final mask's."""
        return self.mask().density()

    def epoch_end(self) -> dict[str, Any]:
        """After every epoch: advance the temperature; at a round's end check the mask and, if another round
        follows, reset the logits for it and call ``on_round_start(round_index)``.

        Returns ``beta``, ``density``, ``round`` (the round the next epoch belongs to), ``new_round`` (True
        when this call started a new round: restart your LR schedule and reset your optimizer's momentum
        there, as ``lottery search cs`` does) and, at a round's end, ``undecided``."""
        self._check_active("epoch_end")
        self.epoch += 1
        finished_round = self.epoch % self.epochs_per_round == 0
        info: dict[str, float] = {}
        new_round = False
        if finished_round:
            info = self._check_round_end()
            if self.epoch < self.total_epochs:
                masking.cs_reset_logits_(self.model, self.hp.beta_final, self.s0)
                self.step_in_round = 0
                self.round_start_mask = self.mask()
                self.round_start_density = self.round_start_mask.density()
                if self.logit_optimizer is not None:
                    self._new_logit_optimizer()
                new_round = True
        masking.set_temperature(self.model, self.beta)
        if new_round and self.on_round_start is not None:
            self.on_round_start(self.round)
        return {"beta": self.beta, "density": self.density(), "round": self.round, "new_round": new_round, **info}

    def _check_round_end(self) -> dict[str, float]:
        import warnings

        from lottery.methods.cs_convergence import MAX_UNDECIDED, undecided_fractions

        undecided = undecided_fractions(self.model, self.hp.beta_final)["overall"]
        mask = self.mask()
        density = mask.density()
        r = (self.epoch - 1) // self.epochs_per_round
        if mask.num_kept() in (0, mask.num_total()):
            warnings.warn(f"CS round {r + 1} ended with density {density:g}: the mask keeps "
                          f"{'none' if mask.num_kept() == 0 else 'all'} of the weights, so it is no ticket; "
                          "ask for a density (density=0.1) or change s0 / lam", RuntimeWarning, stacklevel=3)
        elif undecided > MAX_UNDECIDED:
            warnings.warn(f"CS round {r + 1}: {100 * undecided:.2f} % of the mask logits are undecided "
                          f"(limit {100 * MAX_UNDECIDED:g} %): the hard mask is not the network that was trained; "
                          "use the default recipe (mask_optimizer='adam' with steps_per_epoch), longer rounds or a "
                          "larger beta_final", RuntimeWarning, stacklevel=3)
        return {"undecided": undecided}

    def state_dict(self) -> dict[str, Any]:
        """What, beside the model's state_dict (weights and logits), a resumed loop needs: the position in
        the rounds, the density schedule's start, the logits' own optimizer. Save both and restore the model
        first, then :meth:`load_state_dict`, at the same point of your loop."""
        self._check_active("state_dict")
        return {
            "epoch": self.epoch,
            "step_in_round": self.step_in_round,
            "round_start_density": self.round_start_density,
            "round_start_mask": {n: m.clone() for n, m in self.round_start_mask.items()},
            "logit_optimizer": self.logit_optimizer.state_dict() if self.logit_optimizer is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_active("load_state_dict")
        self.epoch = int(state["epoch"])
        self.step_in_round = int(state["step_in_round"])
        self.round_start_density = float(state["round_start_density"])
        self.round_start_mask = Mask({n: torch.as_tensor(m, dtype=torch.bool) for n, m in state["round_start_mask"].items()})
        if self.logit_optimizer is not None and state.get("logit_optimizer") is not None:
            self.logit_optimizer.load_state_dict(state["logit_optimizer"])
        masking.set_temperature(self.model, self.beta)

    def convergence(self, loader, device: str | torch.device = "cpu") -> dict[str, Any]:
        """The round-end figures (undecided fraction, soft and hard accuracy on ``loader``, flips since
        the start of the current round) for the mask as it is now. For a round that is not the last, call
        it before that round's last ``epoch_end()``: that call resets the logits for the next round."""
        from lottery.methods.cs_convergence import round_convergence

        self._check_active("convergence")
        return round_convergence(self.model, loader, device, self.hp.beta_final, self.round_start_mask)

    def mask(self) -> Mask:
        """The hard mask ``1[s > 0]`` (see :meth:`density` for what it is before training); after
        :meth:`finish`, the mask that ``finish()`` returned."""
        if self._finished is not None:
            return self._finished.clone()
        self._check_active("mask")
        return masking.hard_mask_from_logits(self.model)

    def _refuse_empty(self, mask: Mask, call: str) -> None:
        if mask.num_kept() == 0:
            raise ConfigError(
                f"cs.{call}(): the mask 1[s > 0] keeps none of the weights (density 0), so every weight would be 0. "
                f"Before any training that is the mask of s0 <= 0 (s0 = {self.s0:g}); train first, or ask for a "
                "density (density=0.1). The raw weights: lottery.masking.to_plain_state_dict(model.state_dict(), "
                "apply_masks=False)"
            )

    def _check_same_rescale(self, rescale: bool, call: str) -> None:
        if rescale != self._finished_rescale:
            raise ConfigError(f"cs.{call}(rescale={rescale}) after cs.finish(rescale={self._finished_rescale}): the "
                              "model is already finished; its weights cannot be scaled again")

    def finish(self, rescale: bool = True) -> Mask:
        """Remove the soft masks, leaving a plain model with exact zeros where ``s <= 0``; returns the mask.

        With ``rescale`` (default) the kept weights are those of the trained network in the limit
        beta -> infinity, ``w / sigmoid(s0)`` when the mask is scaled by ``sigmoid(s0)``: at the end of
        a round each kept weight acts as ``w * sigmoid(beta*s) / sigmoid(s0)`` ~ ``w / sigmoid(s0)``, so
        dropping the factor would change the function that was trained (x2 at s0 = 0). Use
        ``rescale=False`` for the raw ``w * 1[s > 0]``.

        With ``mask_optimizer="sgd"`` the logits' parameter group (and its momentum) is removed from your
        optimizer, which then holds exactly the plain model's parameters again; an LR scheduler built over
        it while the group was there must be rebuilt for further training. A mask that keeps no weight is
        refused (``ConfigError``; nothing is changed). Calling ``finish()`` again returns the same mask and
        changes nothing (the weights are rescaled once); ``step()``, ``penalty()``, ``epoch_end()`` and the
        other calls that need the soft masks raise ``ConfigError`` from then on.
        """
        if self._finished is not None:
            self._check_same_rescale(rescale, "finish")
            return self._finished.clone()
        self._check_active("finish")
        self._refuse_empty(self.mask(), "finish")
        mask = harden_soft_masks(self.model, self.s0, self.hp.scale_by_s0 and rescale)
        if self._logit_group is not None and self.optimizer is not None:
            for p in self._logit_group["params"]:
                self.optimizer.state.pop(p, None)
            self.optimizer.param_groups[:] = [g for g in self.optimizer.param_groups if g is not self._logit_group]
            self._logit_group = None
        self.logit_optimizer = None
        self._finished, self._finished_rescale = mask, rescale
        return mask.clone()

    def plain_state_dict(self, rescale: bool = True) -> dict[str, torch.Tensor]:
        """The ``state_dict`` that :meth:`finish` would leave, without changing the model: the unwrapped
        model's keys (no ``*_mask_logits``), kept weights as ``finish(rescale)`` gives them, pruned weights
        exactly 0, copies of every tensor. It loads strictly into a fresh, unwrapped model of the same class.
        After ``finish()``: a copy of the finished model's ``state_dict``.

        ``model.state_dict()`` of a wrapped model instead holds the raw weights ``w`` under the plain keys
        plus one ``<weight>_mask_logits`` key per masked weight (what a resumed search needs; a plain model
        refuses those keys); ``lottery.masking.to_plain_state_dict`` of it drops the logits and gives
        ``w * 1[s > 0]`` without the ``1 / sigmoid(s0)`` factor (``apply_masks=False``: the raw ``w``)."""
        if self._finished is not None:
            self._check_same_rescale(rescale, "plain_state_dict")
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._check_active("plain_state_dict")
        self._refuse_empty(self.mask(), "plain_state_dict")
        state = masking.to_plain_state_dict(self.model.state_dict(), apply_masks=True)
        factor = _limit_factor(self.s0) if self.hp.scale_by_s0 and rescale else None
        names = set(masking.mask_logits(self.model))
        out = {}
        for k, v in state.items():
            v = v.detach()
            # the same operations as harden_soft_masks, so the values are identical
            out[k] = v * factor if factor is not None and k in names else v.clone()
        return out


def harden_soft_masks(model: nn.Module, s0: float, scale_by_s0: bool) -> Mask:
    """Replace the soft masks by their beta -> infinity limit ``1[s > 0] / sigmoid(s0)`` (or ``1[s > 0]``
    without the scaling) folded into the weights; returns the hard mask. Pruned weights are exact zeros."""
    mask = masking.remove_soft_mask(model, hard=True)
    if scale_by_s0:
        factor = _limit_factor(s0)
        with torch.no_grad():
            for name in mask:
                model.get_parameter(name).mul_(factor)
    return mask


def _limit_factor(s0: float) -> float:
    """``1 / sigmoid(s0)``: the beta -> infinity limit of a kept weight's scaled soft mask."""
    return 1.0 / torch.sigmoid(torch.tensor(float(s0), dtype=torch.float64)).item()


# -- on lottery's engine ----------------------------------------------------------------------------
class TemperatureCallback(Callback):
    """Sets beta before each epoch (or step) of a round: 1 first, beta_final last."""

    def __init__(self, hp: CSHparams):
        self.hp = hp

    def _set(self, trainer: Trainer) -> None:
        if self.hp.temperature_schedule == "epoch":
            beta = temperature(trainer.epoch, math.ceil(trainer.end.epochs), self.hp.beta_final)
        else:
            beta = temperature(trainer.iteration, trainer.end.iteration, self.hp.beta_final)
        masking.set_temperature(trainer.model, beta)
        self.beta = beta

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self._set(trainer)

    def on_step_start(self, trainer: Trainer) -> None:
        if self.hp.temperature_schedule == "iteration":
            self._set(trainer)


class PenaltyCallback(Callback):
    """Adds ``lam * sum(m)`` to the loss and reports beta, hard-mask density and the penalty."""

    def __init__(self, hp: CSHparams, temperature_cb: TemperatureCallback, round_index: int):
        self.hp = hp
        self.temperature_cb = temperature_cb
        self.round_index = round_index
        self.last_penalty = 0.0

    def extra_loss(self, trainer: Trainer) -> torch.Tensor:
        # the trainer adds this to the loss of the forward pass it has just run and backpropagates both
        # together: the masks of that forward pass can be reused
        p = mask_penalty(trainer.model, self.hp.lam, self.hp.penalty, reuse_forward=True)
        self.last_penalty = p.detach()
        return p

    def on_evaluate(self, trainer: Trainer, row: dict[str, Any]) -> None:
        row["round"] = self.round_index
        row["beta"] = float(getattr(self.temperature_cb, "beta", 1.0))
        row["density"] = masking.hard_mask_from_logits(trainer.model).density()
        row["penalty"] = float(self.last_penalty)


class SnapshotCallback(Callback):
    """Hands a copy of the model's raw weights and buffers (mask keys dropped) at one iteration to
    ``on_snapshot``: the rewind point."""

    def __init__(self, iteration: int, on_snapshot):
        self.iteration = iteration
        self.on_snapshot = on_snapshot

    def _take(self, trainer: Trainer) -> None:
        state = masking.to_plain_state_dict(trainer.model.state_dict(), apply_masks=False)
        self.on_snapshot({k: v.detach().clone() for k, v in state.items()})

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.iteration == self.iteration:
            self._take(trainer)

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.iteration == self.iteration:
            self._take(trainer)


#: Optimizers whose update is exactly 0 where the gradient, the weight and the per-weight state are 0
#: (SGD with momentum, Nesterov, dampening and weight decay; Adam and AdamW with or without amsgrad).
#: Exact types: a subclass may change the step.
GRADIENT_MASK_SAFE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW,
)


class EnforceMaskCallback(Callback):
    """Keeps hard-pruned weights exactly 0 at every step of training.

    ``every_step=True`` re-zeroes them after every optimizer step. That is a pass over every masked
    weight per step (about 3 % of a LeNet-300-100 step on CPU, benchmarks/speed.py), and usually
    redundant: the gradient hook of :func:`masking.attach_hard_mask` zeroes the pruned gradient, so
    with zero weights and zero optimizer state at pruned positions the optimizers in
    :data:`GRADIENT_MASK_SAFE_OPTIMIZERS` never move them. ``every_step=None`` (the default) therefore
    re-zeroes the weights *and* the optimizer state at pruned positions once, at the start, and after
    a step only when a mask changed (GMP's pruning events, a callback attaching a new mask); it falls
    back to every step under ``torch.distributed`` (DDP's gradient reduction and our hook are not
    ordered) or with any other optimizer. At every epoch end it checks that pruned weights are 0; if
    something else moved them it warns, re-zeroes and re-zeroes every step from then on.
    Training of the kept weights is identical either way (state at pruned positions never reaches them).
    """

    def __init__(self, every_step: bool | None = None):
        self.every_step = every_step
        self._per_step = True
        self._version: tuple = ()

    def gradient_mask_suffices(self, trainer: Trainer) -> bool:
        """Whether the gradient hook alone keeps pruned weights at 0 in this trainer (see class doc)."""
        from lottery.distributed import is_distributed

        if is_distributed():
            return False
        return all(type(opt) in GRADIENT_MASK_SAFE_OPTIMIZERS for opt in trainer.optimizers)

    def _rezero(self, trainer: Trainer) -> None:
        masking.enforce_masks(trainer.model)
        if not self._per_step:  # only the known optimizers' state is known to be safe to edit
            masking.zero_pruned_optimizer_state_(trainer.model, trainer.optimizers)
        self._version = masking.hard_mask_version(trainer.model)

    def on_fit_start(self, trainer: Trainer) -> None:
        self._per_step = self.every_step if self.every_step is not None else not self.gradient_mask_suffices(trainer)
        self._rezero(trainer)

    def on_step_end(self, trainer: Trainer) -> None:
        if self._per_step:
            masking.enforce_masks(trainer.model)
        elif masking.hard_mask_version(trainer.model) != self._version:
            self._rezero(trainer)

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        if self._per_step or masking.pruned_weights_are_zero(trainer.model):
            return
        import warnings

        warnings.warn(
            "pruned weights became non-zero although their gradient is masked (an optimizer or callback "
            "changed them); they are re-zeroed, from now on after every step (EnforceMaskCallback(every_step=True))",
            RuntimeWarning, stacklevel=2,
        )
        self._per_step = True
        masking.enforce_masks(trainer.model)


def make_search_optimizers(model: nn.Module, training: TrainingHparams, hp: CSHparams,
                           round_iterations: int | None = None) -> list[torch.optim.Optimizer]:
    """Two optimizers: the weights with the recipe, and the logits (never weight-decayed).

    Logits: ``adam`` (default) a constant learning rate (``follow_schedule=False``: the weights' LR
    schedule does not reach it, so logits still move at the round's end, when the temperature is highest
    and the mask is decided); ``sgd`` the reference code's SGD with the weights' LR and schedule."""
    logits = list(masking.mask_logits(model).values())
    logit_ids = {id(p) for p in logits}
    weights = [p for p in model.parameters() if id(p) not in logit_ids]
    if round_iterations is None and hp.mask_optimizer == "adam" and hp.mask_lr is None:
        raise ConfigError("make_search_optimizers: Adam logits without mask_lr need round_iterations (steps per round)")
    lr = hp.logit_lr(training.lr, round_iterations or 1)
    if hp.mask_optimizer == "adam":
        logit_opt: torch.optim.Optimizer = torch.optim.Adam(logits, lr=lr, weight_decay=0.0)
        for group in logit_opt.param_groups:
            group["base_lr"] = lr
            group["follow_schedule"] = False
    else:
        mask_recipe = training.replace(optimizer="sgd", lr=lr, momentum=hp.mask_momentum, nesterov=hp.mask_nesterov)
        logit_opt = make_optimizer(logits, mask_recipe, weight_decay=0.0)
    return [make_optimizer(weights, training), logit_opt]


def search_round_callbacks(hp: CSHparams, round_index: int, start_density: float = 1.0) -> list[Callback]:
    """Temperature, penalty and (with a target density) the density schedule of one search round."""
    t = TemperatureCallback(hp)
    callbacks: list[Callback] = [t, PenaltyCallback(hp, t, round_index)]
    if hp.density is not None:
        callbacks.append(DensityCallback(hp.density, round_index, hp.rounds, start_density, hp.density_ramp,
                                         tie_gap(hp.beta_final)))
    return callbacks
