"""Stochastic L0 regularisation with hard concrete gates (Louizos, Welling & Kingma, ICLR 2018), as
docs/methods.md states it.

The stochastic counterpart of Continuous Sparsification (CS paper, second research question): one gate
``z`` per prunable weight ``w`` (the fair counterpart of CS's per-weight mask), the network uses
``w * z``. Each gate has a trainable ``log_alpha`` of the weight's shape.

* training (``module.training``): a fresh sample per forward pass (one per minibatch)::

      u ~ U(0, 1)
      s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
      z = clamp(s * (zeta - gamma) + gamma, 0, 1)            beta = 2/3, gamma = -0.1, zeta = 1.1

  The stretch to ``(gamma, zeta)`` and the clamp make ``z`` exactly 0 and exactly 1 with positive
  probability, so the expected number of non-zero gates is differentiable in ``log_alpha``.
* penalty (the expected L0 norm): ``lam * sum(sigmoid(log_alpha - beta * log(-gamma / zeta)))``, i.e.
  ``lam * sum(P(z != 0))``; ``penalty='mean'`` divides by the number of gates.
* evaluation (``module.eval()``): deterministic ``z = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``;
  the binary mask is ``z > 0`` (equivalently ``log_alpha > log(-gamma / zeta)``). The weights of the
  network evaluated are ``w * z`` (not ``w * 1[z > 0]``): the pruned network of
  :func:`remove_l0_gates` (``bake=True``) is exactly that network, with the pruned weights exactly 0.

Initialisation (Louizos et al.): ``log_alpha ~ N(log(1 - p) - log(p), init_std)`` for a drop rate ``p``
(``init_drop_rate`` 0.5 gives mean 0).

The gates are a ``torch.nn.utils.parametrize`` parametrisation, like CS's soft masks in
:mod:`lottery.masking`, with the same ``state_dict`` convention: the raw weight keeps its key
(``fc1.weight``), the gate parameters are saved as ``fc1.weight_log_alpha`` (a suffix of their own, so
they are never mistaken for CS logits, whose threshold is 0). ``beta``, ``gamma`` and ``zeta`` are not in
the ``state_dict``: give the same values when rebuilding a gated model (:func:`attach_l0_gates` with any
init, then ``load_state_dict``).

Optimisation: two optimizers, as CS. The weights use the training recipe; the ``log_alpha`` use their own
(no weight decay), Adam by default (Louizos et al. used Adam): the penalty's gradient per gate is
``lam * sigmoid'(.)``, tiny and unnormalised, so with SGD at the weights' learning rate the gates of a
40-epoch run barely move unless ``lam`` is raised by orders of magnitude; Adam normalises each gate's
step, so ``log_alpha`` moves by about ``gate_lr`` per step wherever the penalty outweighs the task
gradient's noise. SGD with momentum (like CS's logits) is available with ``gate_optimizer='sgd'``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from lottery import masking
from lottery.engine import Callback, Trainer, make_optimizer
from lottery.errors import ConfigError
from lottery.step import validate_step_spec
from lottery.hparams import Hparams, TrainingHparams
from lottery.masks import Mask
from lottery.methods.cs import SnapshotCallback

__all__ = [
    "BETA",
    "GAMMA",
    "ZETA",
    "HardConcreteGate",
    "L0Hparams",
    "L0PenaltyCallback",
    "L0SnapshotCallback",
    "LOG_ALPHA_SUFFIX",
    "attach_l0_gates",
    "expected_density",
    "expected_l0",
    "gate_probability_nonzero",
    "hard_concrete_deterministic",
    "hard_concrete_sample",
    "has_l0_gate",
    "l0_gates",
    "l0_hard_mask",
    "l0_penalty",
    "log_alphas",
    "make_l0_optimizers",
    "non_gate_parameters",
    "plain_state_dict",
    "remove_l0_gates",
    "search_callbacks",
]

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
LOG_ALPHA_SUFFIX = "_log_alpha"
DEFAULT_ADAM_GATE_LR = 1e-3  # Louizos et al.'s learning rate (Adam)

_L0_ATTR = "_lottery_l0_gates"  # tuple of tensor names with an L0 gate on this module
_L0_HANDLES = "_lottery_l0_handles"
_L0_ORDER = "_lottery_l0_param_order"
_EPS = 1e-6  # u is drawn from [eps, 1 - eps]: log u and log(1 - u) stay finite


# ============================================================================ hparams
@dataclass(frozen=True)
class L0Hparams(Hparams):
    """The hparams of a stochastic-L0 (hard concrete) search; used for pruning and for ticket search."""

    # 1e-5: on the fashion_lenet recipe (40 epochs) about a third of LeNet-300-100's weights are kept
    # (1e-6: ~0.96, 3e-5: ~0.09, 1e-4: ~0.02; one seed, Adam gates at 1e-3)
    lam: float = 1e-5
    penalty: str = "sum"  # sum: lam * sum(P(z != 0)); mean: divided by the number of gates
    init_drop_rate: float = 0.5  # log_alpha ~ N(log(1 - p) - log(p), init_std)
    init_std: float = 0.01
    gate_beta: float = BETA
    gate_gamma: float = GAMMA
    gate_zeta: float = ZETA
    rewind: str = "2ep"  # the rewind point k, saved during the search
    search_steps: str | None = None  # length of the search; None: the training recipe's length
    search_milestones: tuple[str, ...] | None = None  # LR milestones of the search; None: the recipe's
    gate_optimizer: str = "adam"  # adam (Louizos et al.) or sgd (like CS's mask logits)
    gate_lr: float | None = None  # None: 1e-3 for adam, the weights' learning rate for sgd
    gate_momentum: float = 0.9  # sgd only
    gate_nesterov: bool = True  # sgd only
    finetune_steps: str = "0ep"  # pruning mode: fine-tuning of the pruned network

    _prefix = "l0"
    _help = {
        "lam": "penalty weight on the expected number of non-zero gates",
        "penalty": "sum (expected L0) or mean (divided by the number of gates)",
        "init_drop_rate": "initial drop rate p: log_alpha starts at log(1-p) - log(p) (0.5: 0)",
        "init_std": "standard deviation of the initial log_alpha",
        "gate_beta": "hard concrete temperature beta",
        "gate_gamma": "lower end of the stretched interval (< 0)",
        "gate_zeta": "upper end of the stretched interval (> 1)",
        "rewind": "rewind point k saved during the search, e.g. 2ep or 500it",
        "search_steps": "length of the search (default: the training length)",
        "search_milestones": "LR milestones of the search (default: the training recipe's)",
        "gate_optimizer": "optimizer of the log_alpha: adam (Louizos et al.) or sgd",
        "gate_lr": "learning rate of the log_alpha (default: 1e-3 with adam, the weights' with sgd)",
        "gate_momentum": "SGD momentum of the log_alpha (sgd only)",
        "gate_nesterov": "Nesterov momentum for the log_alpha (sgd only)",
        "finetune_steps": "pruning mode: fine-tune the pruned network this long",
    }

    def __post_init__(self) -> None:
        self._check_types()
        self._non_negative("lam", "init_std")
        self._fraction_below_one("gate_momentum")
        self._choice("penalty", ("sum", "mean"))
        p = self.init_drop_rate
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not (0 < p < 1):
            raise ConfigError(f"L0Hparams.init_drop_rate must be strictly between 0 and 1, got {p!r}")
        self._positive("gate_beta")
        self._finite("gate_gamma", "gate_zeta")
        if not self.gate_gamma < 0:
            raise ConfigError(f"L0Hparams.gate_gamma must be negative (exact zeros need it), got {self.gate_gamma}")
        if not self.gate_zeta > 1:
            raise ConfigError(f"L0Hparams.gate_zeta must be greater than 1 (exact ones need it), got {self.gate_zeta}")
        self._step("rewind", "finetune_steps")
        if self.search_steps is not None:
            self._positive_step("search_steps")
        for m in self.search_milestones or ():
            validate_step_spec(m, "L0Hparams.search_milestones")
        self._choice("gate_optimizer", ("adam", "sgd"))
        if self.gate_lr is not None:
            self._positive("gate_lr")
        if self.gate_optimizer == "sgd" and self.gate_nesterov and self.gate_momentum == 0:
            raise ConfigError("L0Hparams.gate_nesterov needs gate_momentum > 0 (or --no-gate-nesterov)")

    @property
    def init_mean(self) -> float:
        return math.log(1.0 - self.init_drop_rate) - math.log(self.init_drop_rate)

    def search_recipe(self, training: TrainingHparams) -> TrainingHparams:
        """The training recipe of the search."""
        changes: dict[str, Any] = {}
        if self.search_steps is not None:
            changes["training_steps"] = self.search_steps
        if self.search_milestones is not None:
            changes["milestones"] = tuple(self.search_milestones)
            if not self.search_milestones and training.schedule == "multistep":
                changes["schedule"] = "constant"
        return training.replace(**changes) if changes else training


# ============================================================================ the math
def hard_concrete_sample(
    log_alpha: torch.Tensor, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA,
    u: torch.Tensor | None = None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One sample of the hard concrete gate per entry of ``log_alpha`` (differentiable in ``log_alpha``).

    ``u`` (uniform in (0, 1), clamped to ``[1e-6, 1 - 1e-6]``) may be given; otherwise it is drawn.
    """
    if u is None:
        u = torch.rand(log_alpha.shape, dtype=log_alpha.dtype, device=log_alpha.device, generator=generator)
    u = u.clamp(_EPS, 1.0 - _EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0)


def hard_concrete_deterministic(log_alpha: torch.Tensor, gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """The test-time gate ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(log_alpha) * (zeta - gamma) + gamma, 0.0, 1.0)


def gate_probability_nonzero(log_alpha: torch.Tensor, beta: float = BETA, gamma: float = GAMMA,
                             zeta: float = ZETA) -> torch.Tensor:
    """``P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))`` per gate."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


# ============================================================================ the parametrisation
class HardConcreteGate(nn.Module):
    """Parametrisation ``w -> w * z`` with ``z`` a hard concrete gate: sampled in training mode,
    deterministic in evaluation mode (it follows ``module.train()`` / ``module.eval()`` of the model)."""

    def __init__(self, log_alpha: torch.Tensor, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA):
        super().__init__()
        self.log_alpha = nn.Parameter(log_alpha.detach().clone())
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)

    def sample(self) -> torch.Tensor:
        return hard_concrete_sample(self.log_alpha, self.beta, self.gamma, self.zeta)

    def deterministic(self) -> torch.Tensor:
        return hard_concrete_deterministic(self.log_alpha, self.gamma, self.zeta)

    def gate(self) -> torch.Tensor:
        return self.sample() if self.training else self.deterministic()

    def probability_nonzero(self) -> torch.Tensor:
        return gate_probability_nonzero(self.log_alpha, self.beta, self.gamma, self.zeta)

    def hard_mask(self) -> torch.Tensor:
        """``z > 0`` of the test-time gate."""
        return self.deterministic().detach() > 0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.gate()

    def extra_repr(self) -> str:
        return f"shape={tuple(self.log_alpha.shape)}, beta={self.beta:g}, gamma={self.gamma:g}, zeta={self.zeta:g}"


def has_l0_gate(module: nn.Module, tensor_name: str = "weight") -> bool:
    return tensor_name in module.__dict__.get(_L0_ATTR, ())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _gated(model: nn.Module) -> Iterable[tuple[str, nn.Module, str]]:
    for module_name, module in model.named_modules():
        for t in module.__dict__.get(_L0_ATTR, ()):
            yield _join(module_name, t), module, t


def _gate(module: nn.Module, tensor_name: str) -> HardConcreteGate:
    return module.parametrizations[tensor_name][0]


def l0_gates(model: nn.Module) -> dict[str, HardConcreteGate]:
    """The gate modules by weight name, in module order."""
    return {name: _gate(module, t) for name, module, t in _gated(model)}


def log_alphas(model: nn.Module) -> dict[str, nn.Parameter]:
    """The ``log_alpha`` parameters by weight name (for the gate optimizer: no weight decay)."""
    return {name: g.log_alpha for name, g in l0_gates(model).items()}


def non_gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter except the ``log_alpha`` (the weight optimizer's parameters)."""
    ids = {id(p) for p in log_alphas(model).values()}
    return [p for p in model.parameters() if id(p) not in ids]


# -- state_dict: the raw weight under its own key, the gate parameters as <weight>_log_alpha -----------
def _state_dict_post_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    names = module.__dict__.get(_L0_ATTR, ())
    if not names:
        return
    rename = {}
    for t in names:
        rename[f"{prefix}parametrizations.{t}.original"] = prefix + t
        rename[f"{prefix}parametrizations.{t}.0.log_alpha"] = prefix + t + LOG_ALPHA_SUFFIX
    # this module's keys (its parametrisations' included) were the last ones added: re-add them renamed
    own = [k for k in state_dict if k.startswith(prefix)]
    items = [(k, state_dict.pop(k)) for k in own]
    weights = [(rename[k], v) for k, v in items if k in rename and not rename[k].endswith(LOG_ALPHA_SUFFIX)]
    gates = [(rename[k], v) for k, v in items if k in rename and rename[k].endswith(LOG_ALPHA_SUFFIX)]
    others = [(k, v) for k, v in items if k not in rename]
    for k, v in weights + others + gates:
        state_dict[k] = v


def _load_pre_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any, strict: bool,
                   missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    for t in module.__dict__.get(_L0_ATTR, ()):
        if prefix + t in state_dict:
            state_dict[f"{prefix}parametrizations.{t}.original"] = state_dict.pop(prefix + t)
        if prefix + t + LOG_ALPHA_SUFFIX in state_dict:
            state_dict[f"{prefix}parametrizations.{t}.0.log_alpha"] = state_dict.pop(prefix + t + LOG_ALPHA_SUFFIX)


def _public_key(key: str) -> str:
    parts = key.split(".")
    if "parametrizations" in parts:
        i = len(parts) - 1 - parts[::-1].index("parametrizations")
        tail = parts[i + 2:]
        if tail == ["original"]:
            return ".".join(parts[:i] + [parts[i + 1]])
        if tail == ["0", "log_alpha"]:
            return ".".join(parts[:i] + [parts[i + 1] + LOG_ALPHA_SUFFIX])
    return key


def _load_post_hook(module: nn.Module, incompatible_keys: Any) -> None:
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [_public_key(k) for k in keys]


# -- attaching and removing ---------------------------------------------------------------------------
def attach_l0_gates(
    model: nn.Module,
    names: Iterable[str] | None = None,
    *,
    ignore: Iterable[str] | str = (),
    init_drop_rate: float = 0.5,
    init_std: float = 0.01,
    beta: float = BETA,
    gamma: float = GAMMA,
    zeta: float = ZETA,
    log_alpha_init: Mapping[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, nn.Parameter]:
    """Put a hard concrete gate on each selected weight; returns the new ``log_alpha`` by weight name.

    ``names``: the weights (default: every prunable weight minus ``ignore``). ``log_alpha`` is drawn from
    ``N(log(1-p) - log(p), init_std)`` with ``p = init_drop_rate`` (from ``generator``, default the global
    RNG), unless ``log_alpha_init`` gives it per name. A weight with a hard or CS soft mask, or any other
    parametrisation, raises :class:`ConfigError`.
    """
    if not (0 < init_drop_rate < 1):
        raise ConfigError(f"init_drop_rate must be strictly between 0 and 1, got {init_drop_rate}")
    if names is None:
        names = list(masking.prunable_weights(model, ignore))
    elif ignore:
        raise ConfigError("attach_l0_gates: 'ignore' only applies when no names are given")
    names = [names] if isinstance(names, str) else list(names)
    params = masking.logical_named_parameters(model)
    mean = math.log(1.0 - init_drop_rate) - math.log(init_drop_rate)
    targets = []
    for name in names:
        if name not in params:
            raise ConfigError(f"{name} is not a parameter of {type(model).__name__}")
        module_name, _, t = name.rpartition(".")
        module = model.get_submodule(module_name)
        if masking.has_hard_mask(module, t) or masking.has_soft_mask(module, t):
            raise ConfigError(f"{name} already has a hard or CS mask; remove it (masking.remove_masks) before "
                              "attaching an L0 gate")
        if parametrize.is_parametrized(module, t) and not has_l0_gate(module, t):
            raise ConfigError(f"{name} already has another parametrisation; cannot add an L0 gate")
        w = params[name]
        if log_alpha_init is not None and name in log_alpha_init:
            la = torch.as_tensor(log_alpha_init[name], dtype=w.dtype)
            if tuple(la.shape) != tuple(w.shape):
                raise ConfigError(f"log_alpha_init[{name}]: expected shape {tuple(w.shape)}, got {tuple(la.shape)}")
        else:
            noise = torch.randn(w.shape, generator=generator, dtype=torch.float32)
            la = (mean + init_std * noise).to(w.dtype)
        targets.append((name, module, t, la))
    out: dict[str, nn.Parameter] = {}
    for name, module, t, la in targets:
        if has_l0_gate(module, t):
            _remove_one(module, t, bake=False)
        w = module._parameters[t]
        if _L0_ORDER not in module.__dict__:
            module.__dict__[_L0_ORDER] = tuple(module._parameters)
        gate = HardConcreteGate(la.to(device=w.device), beta, gamma, zeta)
        gate.eval()  # the shape check at registration runs the gate once: no random draw for it
        parametrize.register_parametrization(module, t, gate)
        gate.train(module.training)
        module.__dict__[_L0_ATTR] = tuple(module.__dict__.get(_L0_ATTR, ())) + (t,)
        if _L0_HANDLES not in module.__dict__:
            module.__dict__[_L0_HANDLES] = (
                module.register_state_dict_post_hook(_state_dict_post_hook),
                module.register_load_state_dict_pre_hook(_load_pre_hook),
                module.register_load_state_dict_post_hook(_load_post_hook),
            )
        out[name] = gate.log_alpha
    return out


def _remove_one(module: nn.Module, t: str, bake: bool) -> torch.Tensor:
    gate = _gate(module, t)
    with torch.no_grad():
        z = gate.deterministic().detach()
    keep = z > 0
    parametrize.remove_parametrizations(module, t, leave_parametrized=False)
    order = module.__dict__.get(_L0_ORDER, ())
    if t in order:  # the weight back at its original place: state_dict keys in the plain module's order
        params = module._parameters
        rank = {k: i for i, k in enumerate(order)}
        items = [(k, params.pop(k)) for k in list(params)]
        for k, v in sorted(items, key=lambda kv: rank.get(kv[0], len(rank))):
            params[k] = v
    if bake:
        with torch.no_grad():
            w = module._parameters[t]
            w.mul_(z.to(w.dtype)).masked_fill_(~keep, 0)
    remaining = tuple(x for x in module.__dict__[_L0_ATTR] if x != t)
    if remaining:
        module.__dict__[_L0_ATTR] = remaining
    else:
        del module.__dict__[_L0_ATTR]
        module.__dict__.pop(_L0_ORDER, None)
        for handle in module.__dict__.pop(_L0_HANDLES, ()):
            handle.remove()
    return keep.cpu()


def remove_l0_gates(model: nn.Module, bake: bool = True) -> Mask:
    """Remove every L0 gate, leaving plain parameters under their own names; returns the mask ``z > 0``.

    ``bake=True`` (default): each weight becomes ``w * z`` with the test-time gate ``z`` (the network the
    model computes in eval mode; pruned weights exactly 0). ``bake=False`` leaves the raw weights.
    """
    return Mask({name: _remove_one(module, t, bake) for name, module, t in list(_gated(model))})


def l0_hard_mask(model: nn.Module) -> Mask:
    """The binary mask ``z > 0`` of the test-time gates, on the CPU."""
    return Mask({name: g.hard_mask().cpu() for name, g in l0_gates(model).items()})


def expected_l0(model: nn.Module) -> torch.Tensor:
    """``sum over gates of P(z != 0)`` (differentiable)."""
    terms = [g.probability_nonzero().sum() for g in l0_gates(model).values()]
    if not terms:
        raise ConfigError("the model has no L0 gates: attach them first (attach_l0_gates)")
    return torch.stack(terms).sum()


def expected_density(model: nn.Module) -> float:
    """Expected fraction of non-zero gates during training."""
    n = sum(g.log_alpha.numel() for g in l0_gates(model).values())
    with torch.no_grad():
        return float(expected_l0(model)) / n


def l0_penalty(model: nn.Module, lam: float, mode: str = "sum") -> torch.Tensor:
    """``lam * sum(P(z != 0))``, or divided by the number of gates for ``mode='mean'``."""
    total = expected_l0(model)
    if mode == "mean":
        total = total / sum(g.log_alpha.numel() for g in l0_gates(model).values())
    elif mode != "sum":
        raise ConfigError(f"penalty mode must be sum or mean, got {mode!r}")
    return lam * total


def plain_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A gated model's state_dict without the ``*_log_alpha`` entries: the raw weights and buffers."""
    return {k: v for k, v in state_dict.items()
            if not (k.endswith(LOG_ALPHA_SUFFIX) and k[: -len(LOG_ALPHA_SUFFIX)] in state_dict)}


# ============================================================================ on lottery's engine
class L0PenaltyCallback(Callback):
    """Adds ``lam * E[L0]`` to the loss; reports the density of ``z > 0``, the expected density and the
    penalty in every metrics row."""

    def __init__(self, hp: L0Hparams):
        self.hp = hp
        self.last_penalty: torch.Tensor | float = 0.0

    def extra_loss(self, trainer: Trainer) -> torch.Tensor:
        p = l0_penalty(trainer.model, self.hp.lam, self.hp.penalty)
        self.last_penalty = p.detach()
        return p

    def on_evaluate(self, trainer: Trainer, row: dict[str, Any]) -> None:
        row["density"] = l0_hard_mask(trainer.model).density()
        row["expected_density"] = expected_density(trainer.model)
        row["penalty"] = float(self.last_penalty)


class L0SnapshotCallback(SnapshotCallback):
    """The rewind point of a gated model: raw weights and buffers (no ``*_log_alpha``) at one iteration."""

    def _take(self, trainer: Trainer) -> None:
        state = plain_state_dict(trainer.model.state_dict())
        self.on_snapshot({k: v.detach().clone() for k, v in state.items()})


def gate_recipe(training: TrainingHparams, hp: L0Hparams) -> TrainingHparams:
    """The gate optimizer's recipe (its learning rate follows the same LR schedule as the weights')."""
    if hp.gate_optimizer == "adam":
        return training.replace(optimizer="adam", lr=hp.gate_lr or DEFAULT_ADAM_GATE_LR)
    return training.replace(optimizer="sgd", lr=hp.gate_lr or training.lr, momentum=hp.gate_momentum,
                            nesterov=hp.gate_nesterov and hp.gate_momentum > 0)


def make_l0_optimizers(model: nn.Module, training: TrainingHparams, hp: L0Hparams) -> list[torch.optim.Optimizer]:
    """Two optimizers: the weights with the recipe, the ``log_alpha`` with the gate optimizer and no weight decay."""
    gates = list(log_alphas(model).values())
    if not gates:
        raise ConfigError("the model has no L0 gates: attach them first (attach_l0_gates)")
    return [make_optimizer(non_gate_parameters(model), training),
            make_optimizer(gates, gate_recipe(training, hp), weight_decay=0.0)]


def search_callbacks(hp: L0Hparams) -> list[Callback]:
    return [L0PenaltyCallback(hp)]


def attach_from_hparams(model: nn.Module, names: Sequence[str], hp: L0Hparams,
                        generator: torch.Generator | None = None) -> dict[str, nn.Parameter]:
    """:func:`attach_l0_gates` with the init and gate constants of ``hp``."""
    return attach_l0_gates(model, list(names), init_drop_rate=hp.init_drop_rate, init_std=hp.init_std,
                           beta=hp.gate_beta, gamma=hp.gate_gamma, zeta=hp.gate_zeta, generator=generator)
