"""Typed, frozen hyperparameters: validated on creation, hashed to name run folders, turned into flags.

Following open_lth: every group of hparams is a frozen dataclass. Frozen, because they are hashed to
name run folders (a mutable hparam that changes after hashing would file a run under the wrong name).
Only fields that differ from their default enter the hash, so adding a new field with a default keeps
every existing folder name valid.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import numbers
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from lottery.dataset_names import canonical_dataset_name
from lottery.step import validate_step_spec
from lottery.errors import ConfigError


class Hparams:
    """Mixin for frozen hparams dataclasses. Subclasses set ``_prefix`` and may add ``_help``."""

    _prefix: ClassVar[str] = ""
    _help: ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    def non_default_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value != _field_default(f):
                out[f.name] = _plain(value)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")
        kwargs = {}
        for name, value in d.items():
            if isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    # -- validation helpers used by subclasses' __post_init__ --------------------------------------
    def _positive(self, *names: str) -> None:
        for n in names:
            v = getattr(self, n)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{type(self).__name__}.{n} must be a positive number, got {v!r}")

    def _non_negative(self, *names: str) -> None:
        for n in names:
            v = getattr(self, n)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{type(self).__name__}.{n} must be a non-negative number, got {v!r}")

    def _finite(self, *names: str) -> None:
        for n in names:
            v = getattr(self, n)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ConfigError(f"{type(self).__name__}.{n} must be a finite number, got {v!r}")

    def _choice(self, name: str, choices: tuple[str, ...]) -> None:
        v = getattr(self, name)
        if v not in choices:
            raise ConfigError(f"{type(self).__name__}.{name} must be one of {', '.join(choices)}; got {v!r}")

    def _step(self, *names: str) -> None:
        for n in names:
            validate_step_spec(getattr(self, n), f"{type(self).__name__}.{n}")

    def _positive_step(self, *names: str) -> None:
        from lottery.step import parse_step_spec

        self._step(*names)
        for n in names:
            if parse_step_spec(getattr(self, n)) == (0, 0):
                raise ConfigError(f"{type(self).__name__}.{n} must be a positive length, e.g. '2ep', got {getattr(self, n)!r}")

    def _fraction_below_one(self, *names: str) -> None:
        """Momentum-like fields: in [0, 1) (at 1 or above the velocity never decays and training diverges)."""
        self._non_negative(*names)
        for n in names:
            if getattr(self, n) >= 1:
                raise ConfigError(f"{type(self).__name__}.{n} must be below 1, got {getattr(self, n)!r}")

    def _check_types(self) -> None:
        """Each field holds a value of its annotated type: a bool field a bool (not the string 'no'), an int
        field an integer (not 2.5), a float field a number; ``None`` only where the field is optional."""
        name = type(self).__name__
        for f in fields(self):  # type: ignore[arg-type]
            tp, optional, is_tuple = scalar_type(_type_hints(type(self))[f.name])
            v = getattr(self, f.name)
            if v is None:
                if optional:
                    continue
                raise ConfigError(f"{name}.{f.name} must be set, got None")
            if is_tuple and not isinstance(v, (tuple, list)):
                raise ConfigError(f"{name}.{f.name} must be a list of values, got {v!r}")
            for x in (v if is_tuple else (v,)):
                if not _has_type(x, tp):
                    what = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]
                    raise ConfigError(f"{name}.{f.name} must be {what}{' (each)' if is_tuple else ''}, got {v!r}")


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _has_type(x: Any, tp: Any) -> bool:
    if tp is bool:
        return isinstance(x, bool)
    if tp is int:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)
    if tp is float:
        return isinstance(x, numbers.Real) and not isinstance(x, bool)
    if tp is str:  # names and step specs; a step may also be an iteration count
        return isinstance(x, str) or (isinstance(x, numbers.Integral) and not isinstance(x, bool))
    return True


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def hparams_hash(*groups: Hparams, extra: dict[str, Any] | None = None) -> str:
    """A short stable hash of the non-default fields of several hparams groups.

    Stable across runs and Python versions (JSON with sorted keys, SHA-256), and unchanged when a new
    field with a default is added to any group.
    """
    payload: dict[str, Any] = {}
    for g in groups:
        nd = g.non_default_dict()
        if nd:
            payload[type(g).__name__] = nd
    if extra:
        payload["extra"] = extra
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def field_type(cls: type, name: str) -> Any:
    """The resolved annotation of a dataclass field (handles ``from __future__ import annotations``)."""
    hints = typing.get_type_hints(cls)
    return hints[name]


def scalar_type(tp: Any) -> tuple[type, bool, bool]:
    """Reduce an annotation to (scalar type, is_optional, is_tuple) for command-line parsing."""
    optional = False
    is_tuple = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin is tuple:
        is_tuple = True
        tp = typing.get_args(tp)[0]
    return tp, optional, is_tuple


# --------------------------------------------------------------------------------------------------
# The groups every run has. Method-specific groups live beside their method (lottery.methods.*).


@dataclass(frozen=True)
class DataHparams(Hparams):
    """Which data, and how much of the training files is held out for validation."""

    dataset: str = "fashion-mnist"
    val_size: int = 5000
    augment: bool | None = None  # None: the data set's default (crop+flip for CIFAR, none for MNIST-like)
    # Held-out examples are drawn with this seed, independent of the training seed, so that every
    # run of a comparison is validated on the same images.
    split_seed: int = 0
    # Only for dataset="synthetic" (tests, smoke runs of GPU presets on data of the right shape).
    synthetic_shape: tuple[int, ...] | None = None
    synthetic_classes: int | None = None
    synthetic_train_size: int | None = None
    synthetic_test_size: int | None = None

    _prefix = "data"
    _help = {
        "dataset": "data set name (fashion-mnist, mnist, cifar10, cifar100, imagenet, synthetic)",
        "val_size": "training examples held out for validation (0: none)",
        "augment": "random crop + flip on training batches (default: per data set)",
        "split_seed": "seed of the validation split",
        "synthetic_shape": "synthetic data only: image shape C,H,W",
        "synthetic_classes": "synthetic data only: number of classes",
        "synthetic_train_size": "synthetic data only: training examples (before the validation hold-out)",
        "synthetic_test_size": "synthetic data only: test examples",
    }

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ConfigError("DataHparams.dataset must be a data set name")
        # One data set, one name: `fashion_mnist` and `FashionMNIST` must not make a second set of run folders.
        object.__setattr__(self, "dataset", canonical_dataset_name(self.dataset))
        self._check_types()
        self._non_negative("val_size")
        if self.synthetic_shape is not None and (len(self.synthetic_shape) != 3 or min(self.synthetic_shape) <= 0):
            raise ConfigError(f"DataHparams.synthetic_shape must be three positive sizes C,H,W; got {self.synthetic_shape}")
        for name in ("synthetic_classes", "synthetic_train_size", "synthetic_test_size"):
            if getattr(self, name) is not None:
                self._positive(name)
        if self.synthetic_classes is not None and self.synthetic_classes < 2:
            raise ConfigError(f"DataHparams.synthetic_classes must be at least 2, got {self.synthetic_classes}")
        options = self.synthetic_options()
        if options and self.dataset != "synthetic":
            raise ConfigError(f"DataHparams.synthetic_* options apply only to dataset 'synthetic', not {self.dataset!r}")

    def synthetic_options(self) -> dict:
        """The options ``lottery.data.load_splits('synthetic', ...)`` takes, from the fields that are set."""
        pairs = {"shape": self.synthetic_shape, "num_classes": self.synthetic_classes,
                 "train_size": self.synthetic_train_size, "test_size": self.synthetic_test_size}
        return {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in pairs.items() if v is not None}


@dataclass(frozen=True)
class ModelHparams(Hparams):
    """Which network, and which of its weights are never pruned."""

    model: str = "lenet_300_100"
    # Width multiplier for families that have one: an integer for the CIFAR ResNets, any positive number
    # for Conv-2/4/6 (0.125: an eighth of the channels, the fashion_conv4_narrow CPU benchmark preset).
    width: float | None = None
    # None: the model's default ignore list (docs/methods.md); () prunes every Conv/Linear weight.
    prune_ignore: tuple[str, ...] | None = None

    _prefix = "model"
    _help = {
        "model": "registered model name (lottery models lists them)",
        "width": "width multiplier, for model families that take one (resnet*, conv2/4/6: e.g. 0.25 scales the convolution channels)",
        "prune_ignore": "comma-separated parameter names or patterns never pruned (default: the model's own)",
    }

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("ModelHparams.model must be a model name")
        self._check_types()
        if self.width is not None:
            self._positive("width")
            if float(self.width).is_integer():  # 2.0 from a flag names the same run folder as 2
                object.__setattr__(self, "width", int(self.width))
        if self.prune_ignore is not None and not all(isinstance(p, str) and p for p in self.prune_ignore):
            raise ConfigError(f"ModelHparams.prune_ignore must be parameter names or patterns, got {self.prune_ignore!r}")


@dataclass(frozen=True)
class TrainingHparams(Hparams):
    """One training recipe: optimizer, schedule and length. Steps are written '20ep', '500it'."""

    training_steps: str = "40ep"
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | multistep | cosine
    milestones: tuple[str, ...] = ()  # for multistep: steps where the LR is multiplied by gamma
    gamma: float = 0.1
    warmup_steps: str = "0it"  # linear warm-up from 0 to lr
    # Data order (and augmentation) seed; None means the experiment seed. The stability analysis
    # trains two copies that differ only here.
    data_order_seed: int | None = None
    eval_every: str = "1ep"

    _prefix = "train"
    _help = {
        "training_steps": "length of training, e.g. 40ep or 500it",
        "batch_size": "examples per step",
        "optimizer": "sgd or adam",
        "lr": "peak learning rate",
        "momentum": "SGD momentum",
        "nesterov": "Nesterov momentum",
        "weight_decay": "L2 weight decay",
        "schedule": "learning-rate schedule: constant, multistep or cosine",
        "milestones": "comma-separated steps where multistep multiplies the LR by gamma",
        "gamma": "multistep decay factor",
        "warmup_steps": "linear warm-up length",
        "data_order_seed": "seed of the data order (default: the run seed)",
        "eval_every": "evaluate every this many steps (e.g. 1ep)",
    }

    def __post_init__(self) -> None:
        self._check_types()
        self._step("training_steps", "warmup_steps", "eval_every")
        for m in self.milestones:
            validate_step_spec(m, "TrainingHparams.milestones")
        from lottery.step import parse_step_spec

        if parse_step_spec(self.training_steps) == (0, 0):
            raise ConfigError("TrainingHparams.training_steps must be positive, e.g. '20ep'")
        if parse_step_spec(self.eval_every) == (0, 0):
            raise ConfigError("TrainingHparams.eval_every must be positive, e.g. '1ep'")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size <= 0:
            raise ConfigError(f"TrainingHparams.batch_size must be a positive integer, got {self.batch_size!r}")
        self._positive("lr", "gamma")
        self._non_negative("weight_decay")
        self._fraction_below_one("momentum")
        self._choice("optimizer", ("sgd", "adam"))
        self._choice("schedule", ("constant", "multistep", "cosine"))
        if self.nesterov and self.momentum == 0:
            raise ConfigError("TrainingHparams.nesterov needs momentum > 0")
        if self.schedule == "multistep" and not self.milestones:
            raise ConfigError("TrainingHparams.milestones: the multistep schedule needs at least one milestone")
