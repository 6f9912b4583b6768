"""Sweep job kinds: the registry mapping a kind (``cs``, ``imp``, ...) to the function that runs it."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from lottery.errors import ConfigError, UnknownNameError


# Where the hparams class of each group name lives (used to fill a group the caller left out).
GROUP_CLASSES: dict[str, str] = {
    "data": "lottery.hparams:DataHparams",
    "model": "lottery.hparams:ModelHparams",
    "training": "lottery.hparams:TrainingHparams",
    "cs": "lottery.methods.cs:CSHparams",
    "imp": "lottery.methods.imp:IMPHparams",
    "lrr": "lottery.methods.imp:LRRHparams",
    "finetune": "lottery.methods.imp:FinetuneHparams",
    "oneshot": "lottery.methods.imp:OneShotHparams",
    "l0": "lottery.methods.l0:L0Hparams",
    "gmp": "lottery.methods.gmp:GMPHparams",
}


def _resolve(ref: Any) -> Any:
    """``"package.module:attr"`` -> the attribute (imported now); anything else is returned as is."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


# -- job kinds -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobKind:
    """How to run one kind of job.

    ``runner(job, options) -> results dict`` and ``job_class`` may be given as ``"module:attr"``
    strings: they are imported only when a job of this kind runs (in the worker), so a kind whose module
    is missing costs nothing until it is used, and the kind itself pickles to any worker.
    The job is built as ``job_class(<group>=hparams, ..., seed=seed, **fixed, **spec.extra)``.
    """

    name: str
    runner: Callable[..., dict[str, Any]] | str
    job_class: type | str
    groups: tuple[str, ...] = ("data", "model", "training")
    fixed: tuple[tuple[str, Any], ...] = ()  # job fields the kind sets (CS mode)
    forced: tuple[tuple[str, Any], ...] = ()  # hparams the kind sets, as ("group.field", value)
    dense_reference: bool = False  # runs need the dense run of their (data, model, training, seed)
    folder: Callable[[Any], str] | str | None = None  # job -> run folder name below options.out
    help: str = ""


KINDS: dict[str, JobKind] = {}


def register_kind(kind: JobKind, replace: bool = False) -> JobKind:
    """Add a job kind to the registry (``replace=True`` to overwrite one)."""
    if kind.name in KINDS and not replace:
        raise ConfigError(f"job kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str | JobKind) -> JobKind:
    if isinstance(name, JobKind):
        return name
    try:
        return KINDS[name]
    except KeyError:
        raise UnknownNameError(f"unknown job kind {name!r}; known kinds: {', '.join(sorted(KINDS))}") from None


def kind_available(name: str | JobKind) -> bool:
    """Whether a kind's runner and job class can be imported here (IMP may not be written yet)."""
    kind = get_kind(name)
    try:
        _resolve(kind.runner)
        _resolve(kind.job_class)
        for g in kind.groups:
            _resolve(GROUP_CLASSES[g])
    except (ImportError, AttributeError, KeyError):
        return False
    return True


def available_kinds() -> list[str]:
    return [name for name in KINDS if kind_available(name)]


def _run_dense(job, options) -> dict[str, Any]:
    from lottery.experiment import train_dense

    # wait_for_lock: a dense run the user started by hand in the same --out is waited for, not failed on.
    return train_dense(job, options, wait_for_lock=True)


def _run_folder(job) -> str:
    """The run folder name a pipeline job writes (below ``options.out``), as the pipelines compute it."""
    from lottery.experiment import run_folder_name
    from lottery.hparams import Hparams

    method = [getattr(job, f.name) for f in dataclasses.fields(job)
              if f.name not in ("data", "model", "training") and isinstance(getattr(job, f.name), Hparams)]
    # An iterative run's `levels` is not part of its identity (lottery.pipelines.imp): more levels
    # continue the same folder.
    method = [h.replace(levels=type(h)().levels) if hasattr(h, "levels") else h for h in method]
    return run_folder_name(getattr(job, "kind", "train"), job.data, job.model, job.training, *method, seed=job.seed)


_BASE = ("data", "model", "training")
_IMP = "lottery.pipelines.imp"
register_kind(JobKind("train", _run_dense, "lottery.experiment:DenseJob", folder=_run_folder,
                      help="train a dense network"))
register_kind(JobKind("cs", "lottery.pipelines.cs:run_cs", "lottery.pipelines.cs:CSJob", groups=(*_BASE, "cs"),
                      fixed=(("mode", "ticket"),), dense_reference=True, folder=_run_folder, help="CS ticket search"))
register_kind(JobKind("cs-prune", "lottery.pipelines.cs:run_cs", "lottery.pipelines.cs:CSJob", groups=(*_BASE, "cs"),
                      fixed=(("mode", "prune"),), dense_reference=True, folder=_run_folder, help="CS pruning"))
# IMP trains its own level 0 (it needs the rewind state), so it shares no dense run. LRR, fine-tuning
# and one-shot pruning start from the recipe's dense run and do not wait on its lock: the sweep runs
# that dense job first, so they find it finished.
register_kind(JobKind("imp", f"{_IMP}:run_imp", f"{_IMP}:IMPJob", groups=(*_BASE, "imp"), forced=(("imp.variant", "rewind"),),
                      folder=_run_folder, help="iterative magnitude pruning, rewinding each level to k (IMP, IMP-R)"))
register_kind(JobKind("imp-c", f"{_IMP}:run_imp", f"{_IMP}:IMPJob", groups=(*_BASE, "imp"), forced=(("imp.variant", "continue"),),
                      folder=_run_folder, help="IMP with continued training between levels (IMP-C)"))
register_kind(JobKind("lrr", f"{_IMP}:run_lrr", f"{_IMP}:LRRJob", groups=(*_BASE, "lrr"), dense_reference=True,
                      folder=_run_folder, help="iterative pruning with learning-rate rewinding"))
register_kind(JobKind("finetune", f"{_IMP}:run_finetune", f"{_IMP}:FinetuneJob", groups=(*_BASE, "finetune"),
                      dense_reference=True, folder=_run_folder, help="iterative pruning with fine-tuning"))
register_kind(JobKind("magnitude", "lottery.pipelines.oneshot:run_one_shot", "lottery.pipelines.oneshot:OneShotJob",
                      groups=(*_BASE, "oneshot"),
                      dense_reference=True, folder=_run_folder, help="one-shot magnitude pruning"))
register_kind(JobKind("l0", "lottery.pipelines.l0:run_l0", "lottery.pipelines.l0:L0Job", groups=(*_BASE, "l0"),
                      fixed=(("mode", "ticket"),), dense_reference=True, folder=_run_folder,
                      help="stochastic L0 (hard concrete) ticket search"))
register_kind(JobKind("l0-prune", "lottery.pipelines.l0:run_l0", "lottery.pipelines.l0:L0Job", groups=(*_BASE, "l0"),
                      fixed=(("mode", "prune"),), dense_reference=True, folder=_run_folder,
                      help="stochastic L0 (hard concrete) pruning"))
register_kind(JobKind("gmp", "lottery.pipelines.gmp:run_gmp", "lottery.pipelines.gmp:GMPJob", groups=(*_BASE, "gmp"),
                      dense_reference=True, folder=_run_folder, help="gradual magnitude pruning (Zhu & Gupta 2017)"))
