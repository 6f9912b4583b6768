"""Sweeps: many experiments at once, on a local pool of processes or on a Ray cluster.

A sweep is a list of :class:`JobSpec` -- ``(kind, hparams groups, seed)``, frozen and picklable -- and a
registry maps each ``kind`` to the function that runs it (:data:`KINDS`: ``train``, ``cs``,
``cs-prune``, ``imp``, ``imp-c``, ``lrr``, ``finetune``, ``magnitude``, ``l0``, ``l0-prune``, ``gmp``). Adding a job kind is one
:func:`register_kind` call (plus a :data:`GROUP_CLASSES` line if it brings a new hparams group)::

    register_kind(JobKind("snip", "lottery.pipelines.snip:run_snip", "lottery.pipelines.snip:SnipJob",
                          groups=("data", "model", "training", "snip"), dense_reference=False))

:func:`expand_grid` turns one base spec and ``{field: [values]}`` into the product of all values and
seeds; :func:`run_sweep` runs them::

    base = make_spec("cs", data=DataHparams(...), training=TrainingHparams(...), cs=CSHparams(rounds=3))
    specs = expand_grid(base, {"s0": [0.05, 0, -0.05], "model": ["lenet_300_100", "conv2"]}, seeds=[0, 1, 2])
    result = run_sweep(specs, RunOptions(out="runs"), workers=2)        # or backend="ray"
    result.failures                                                    # the jobs that raised

Every job writes its own hashed run folder (:mod:`lottery.experiment`), so a sweep that is killed and
started again skips the finished runs. Jobs that start from, or compare with, the dense network of
their recipe (CS, LRR, fine-tuning, one-shot pruning) get the dense training of their ``(data, model,
training, seed)`` as a job of its own, run once and before them, so no worker ever waits on, or fails
on, another worker's folder lock; two jobs that would write one folder are refused before anything runs. A job that raises is reported (kind, hparams,
error) and the others go on; ``<out>/sweep_<name>.json`` records every job, its run folder, status and
results, the epochs trained, the wall time, the backend and the number of workers.

Scripts that call :func:`run_sweep` with the local backend need the usual ``if __name__ == "__main__":``
guard: workers are started with the *spawn* method (a forked PyTorch process can deadlock).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import itertools
import json
import os
import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from lottery.errors import ConfigError, LotteryError, UnknownNameError

__all__ = [
    "BACKENDS",
    "GROUP_CLASSES",
    "JobKind",
    "JobOutcome",
    "JobSpec",
    "KINDS",
    "SweepResult",
    "available_kinds",
    "build_job",
    "default_threads_per_worker",
    "dense_reference_spec",
    "expand_grid",
    "get_kind",
    "import_ray",
    "job_labels",
    "kind_available",
    "make_spec",
    "register_kind",
    "run_job",
    "run_sweep",
    "spec_from_job",
]

BACKENDS = ("local", "ray", "serial")

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
register_kind(JobKind("magnitude", f"{_IMP}:run_one_shot", f"{_IMP}:OneShotJob", groups=(*_BASE, "oneshot"),
                      dense_reference=True, folder=_run_folder, help="one-shot magnitude pruning"))
register_kind(JobKind("l0", "lottery.pipelines.l0:run_l0", "lottery.pipelines.l0:L0Job", groups=(*_BASE, "l0"),
                      fixed=(("mode", "ticket"),), dense_reference=True, folder=_run_folder,
                      help="stochastic L0 (hard concrete) ticket search"))
register_kind(JobKind("l0-prune", "lottery.pipelines.l0:run_l0", "lottery.pipelines.l0:L0Job", groups=(*_BASE, "l0"),
                      fixed=(("mode", "prune"),), dense_reference=True, folder=_run_folder,
                      help="stochastic L0 (hard concrete) pruning"))
register_kind(JobKind("gmp", "lottery.pipelines.gmp:run_gmp", "lottery.pipelines.gmp:GMPJob", groups=(*_BASE, "gmp"),
                      dense_reference=True, folder=_run_folder, help="gradual magnitude pruning (Zhu & Gupta 2017)"))


# -- job specs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobSpec:
    """One experiment: a kind, its hparams groups (name -> frozen hparams), a seed, other job fields.

    Frozen and made of frozen parts, so it is hashable (duplicates in a grid collapse) and picklable.
    """

    kind: str
    groups: tuple[tuple[str, Any], ...]
    seed: int = 0
    extra: tuple[tuple[str, Any], ...] = ()  # non-hparams job fields, e.g. ("dense_reference", False)

    def group(self, name: str) -> Any:
        for n, g in self.groups:
            if n == name:
                return g
        raise ConfigError(f"a {self.kind} job has no hparams group {name!r}; it has {', '.join(self.group_names)}")

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.groups)

    def with_values(self, values: Mapping[str, Any]) -> "JobSpec":
        """A copy with ``{"group.field" or "field" or "seed": value}`` changed (validated by the hparams)."""
        kind = get_kind(self.kind)
        groups = dict(self.groups)
        seed = self.seed
        changes: dict[str, dict[str, Any]] = {}
        forced = dict(kind.forced)
        for key, value in values.items():
            if key == "seed":
                seed = _as_seed(value)
                continue
            gname, fname = _resolve_field(self, key)
            if f"{gname}.{fname}" in forced and value != forced[f"{gname}.{fname}"]:
                raise ConfigError(f"{gname}.{fname} is fixed to {forced[f'{gname}.{fname}']!r} by job kind {kind.name!r}")
            changes.setdefault(gname, {})[fname] = tuple(value) if isinstance(value, list) else value
        for gname, ch in changes.items():
            groups[gname] = dataclasses.replace(groups[gname], **ch)
        return dataclasses.replace(self, groups=tuple(groups.items()), seed=seed)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seed": self.seed, **{n: g.to_dict() for n, g in self.groups},
                **({"extra": dict(self.extra)} if self.extra else {})}


def _as_seed(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"a seed must be a non-negative integer, got {value!r}")
    return value


def _resolve_field(spec: JobSpec, key: str) -> tuple[str, str]:
    """``"cs.s0"`` or ``"s0"`` (when exactly one group of the spec has that field) -> (group, field)."""
    if "." in key:
        gname, _, fname = key.partition(".")
        group = spec.group(gname)
        if fname not in {f.name for f in dataclasses.fields(group)}:
            raise ConfigError(f"{type(group).__name__} has no field {fname!r}")
        return gname, fname
    owners = [n for n, g in spec.groups if key in {f.name for f in dataclasses.fields(g)}]
    if len(owners) == 1:
        return owners[0], key
    if not owners:
        known = sorted(f"{n}.{f.name}" for n, g in spec.groups for f in dataclasses.fields(g))
        raise ConfigError(f"no hparam {key!r} in a {spec.kind} job; its hparams are: {', '.join(known)}")
    raise ConfigError(f"hparam {key!r} is ambiguous in a {spec.kind} job; write one of "
                      f"{', '.join(f'{o}.{key}' for o in owners)}")


def make_spec(kind: str, seed: int = 0, **groups_and_fields: Any) -> JobSpec:
    """A :class:`JobSpec`; groups not given get their defaults, dict groups are converted.

    Keywords that are not group names are other job fields (``dense_reference=False``).
    """
    k = get_kind(kind)
    groups: dict[str, Any] = {}
    for gname in k.groups:
        cls = _resolve(GROUP_CLASSES[gname])
        value = groups_and_fields.pop(gname, None)
        if value is None:
            value = cls()
        elif isinstance(value, Mapping):
            value = cls.from_dict(dict(value))
        elif not isinstance(value, cls):
            raise ConfigError(f"{kind} job: group {gname!r} must be a {cls.__name__}, got {type(value).__name__}")
        groups[gname] = value
    fixed = dict(k.fixed)
    clash = sorted(set(groups_and_fields) & set(fixed))
    if clash:
        raise ConfigError(f"job kind {kind!r} sets {', '.join(clash)} itself")
    if groups_and_fields:
        try:
            cls = _resolve(k.job_class)
        except (ImportError, AttributeError):
            cls = None
        if cls is not None and dataclasses.is_dataclass(cls):
            known = {f.name for f in dataclasses.fields(cls)} - set(k.groups) - {"seed"} - set(fixed)
            unknown = sorted(set(groups_and_fields) - known)
            if unknown:
                raise ConfigError(f"a {kind} job has no field {', '.join(unknown)}; "
                                  f"its groups: {', '.join(k.groups)}; other fields: {', '.join(sorted(known)) or 'none'}")
    spec = JobSpec(k.name, tuple(groups.items()), _as_seed(seed), tuple(sorted(groups_and_fields.items())))
    if k.forced:
        # Apply the kind's own settings (IMP-C: variant 'continue') directly, not via with_values.
        changes: dict[str, dict[str, Any]] = {}
        for key, value in k.forced:
            gname, fname = key.split(".", 1)
            changes.setdefault(gname, {})[fname] = value
        groups = {n: (dataclasses.replace(g, **changes[n]) if n in changes else g) for n, g in spec.groups}
        spec = dataclasses.replace(spec, groups=tuple(groups.items()))
    return spec


def spec_from_job(job: Any) -> JobSpec:
    """The :class:`JobSpec` of a pipeline job object (``DenseJob``, ``CSJob``, ...)."""
    if isinstance(job, JobSpec):
        return job
    for name, kind in KINDS.items():
        try:
            cls = _resolve(kind.job_class)
        except (ImportError, AttributeError):
            continue
        if type(job) is not cls or any(getattr(job, f, None) != v for f, v in kind.fixed):
            continue
        if any(getattr(getattr(job, key.split(".")[0]), key.split(".")[1]) != v for key, v in kind.forced):
            continue
        taken = set(kind.groups) | {"seed"} | {f for f, _ in kind.fixed}
        extra = {}
        for f in dataclasses.fields(job):
            if f.name in taken:
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            if getattr(job, f.name) != default:
                extra[f.name] = getattr(job, f.name)
        return JobSpec(name, tuple((g, getattr(job, g)) for g in kind.groups), job.seed, tuple(sorted(extra.items())))
    raise ConfigError(f"no registered job kind runs a {type(job).__name__}")


def build_job(spec: JobSpec, kind: JobKind | None = None) -> Any:
    """The pipeline's job object for a spec (``CSJob(...)`` for kind ``cs``)."""
    kind = kind or get_kind(spec.kind)
    cls = _resolve(kind.job_class)
    return cls(**dict(spec.groups), seed=spec.seed, **dict(kind.fixed), **dict(spec.extra))


def run_job(spec: JobSpec, options, kind: JobKind | None = None) -> dict[str, Any]:
    """Run one spec in this process; return its results dict (exceptions propagate)."""
    kind = kind or get_kind(spec.kind)
    return _resolve(kind.runner)(build_job(spec, kind), options)


def expand_grid(
    base: JobSpec,
    grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]] | None = None,
    seeds: Iterable[int] | None = None,
) -> list[JobSpec]:
    """Specs for every combination of ``grid`` values and seeds, duplicates removed, order kept.

    ``grid`` is ``{field: [values]}`` (the product of all lists) or a list of ``{field: value}``
    points (the "list form": exactly those combinations). A field is written ``"group.field"``
    (``"cs.s0"``, ``"model.model"``) or just ``"field"`` when one group of the spec has it (``"s0"``,
    ``"model"``, ``"lr"``); ``"seed"`` may be a field too. Seeds vary fastest, so the seeds of one
    setting are next to each other. Every value is validated as its hparams group is rebuilt.
    """
    if grid is None:
        points: list[dict[str, Any]] = [{}]
    elif isinstance(grid, Mapping):
        keys = list(grid)
        for k in keys:
            if isinstance(grid[k], (str, bytes)) or not isinstance(grid[k], Iterable):
                raise ConfigError(f"grid values of {k!r} must be a list, got {grid[k]!r}")
        value_lists = [list(grid[k]) for k in keys]
        for k, vals in zip(keys, value_lists):
            if not vals:
                raise ConfigError(f"grid field {k!r} has no values")
        points = [dict(zip(keys, combo)) for combo in itertools.product(*value_lists)]
    else:
        points = [dict(p) for p in grid]
    seed_list = [base.seed] if seeds is None else [_as_seed(s) for s in seeds]
    if not seed_list:
        raise ConfigError("expand_grid: no seeds")
    out: list[JobSpec] = []
    seen: set[JobSpec] = set()
    for point in points:
        spec = base.with_values(point)
        for s in seed_list if "seed" not in point else [spec.seed]:
            one = dataclasses.replace(spec, seed=s)
            if one not in seen:
                seen.add(one)
                out.append(one)
    return out


def dense_reference_spec(spec: JobSpec) -> JobSpec | None:
    """The dense training job a spec shares with the other jobs of its seed, or None."""
    kind = get_kind(spec.kind)
    if not kind.dense_reference or not dict(spec.extra).get("dense_reference", True):
        return None
    return make_spec("train", seed=spec.seed, data=spec.group("data"), model=spec.group("model"),
                     training=spec.group("training"))


def default_threads_per_worker(workers: int) -> int:
    """``max(1, cpus // workers)``: the cores this process may use, shared out without oversubscribing."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, workers))


# -- labels ----------------------------------------------------------------------------------------
def _flat(spec: JobSpec) -> dict[str, Any]:
    return {f"{n}.{k}": v for n, g in spec.groups for k, v in g.to_dict().items()}


def _short_value(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def job_labels(specs: Sequence[JobSpec]) -> list[str]:
    """One short label per spec: kind, model, seed and the hparams that vary among specs of its kind."""
    flats = [_flat(s) for s in specs]
    varying: dict[str, set[str]] = {}
    for spec, flat in zip(specs, flats):
        varying.setdefault(spec.kind, set())
    for kind in varying:
        same = [f for s, f in zip(specs, flats) if s.kind == kind]
        keys = set().union(*(f.keys() for f in same)) if same else set()
        varying[kind] = {k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in same}) > 1}
    labels = []
    for spec, flat in zip(specs, flats):
        parts = [spec.kind, f"{flat.get('model.model', '?')}/{flat.get('data.dataset', '?')}", f"seed={spec.seed}"]
        for key in sorted(varying[spec.kind] - {"model.model", "data.dataset"}):
            parts.append(f"{key.split('.', 1)[1]}={_short_value(flat[key])}")
        labels.append(" ".join(parts))
    return labels


# -- running one job inside a worker ----------------------------------------------------------------
_LOG_QUEUE: Any = None  # set in each local worker: log lines go back to the parent, which owns the bar


def _init_local_worker(threads: int, log_queue: Any) -> None:
    global _LOG_QUEUE
    _LOG_QUEUE = log_queue
    # Never block this process's exit on flushing log lines (a parent that stopped reading, or a queue
    # left locked by a worker that was killed mid-write, would otherwise hang it).
    log_queue.cancel_join_thread()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran: harmless
        pass


def _emit(line: str) -> None:
    if _LOG_QUEUE is not None:
        _LOG_QUEUE.put(line)
    else:
        print(line, file=sys.stderr, flush=True)


def _options_state(options) -> dict[str, Any]:
    return {"out": str(Path(options.out).resolve()), "data_dir": options.data_dir, "device": options.device,
            "download": options.download, "strict": options.strict, "tensorboard": options.tensorboard}


def _execute(kind: JobKind, spec: JobSpec, opts: dict[str, Any], label: str, log: Callable[[str], None],
             threads: int | None = None) -> dict[str, Any]:
    """Run one job; never raises: returns ``{"ok": True, "results": ...}`` or the error and traceback."""
    from lottery.experiment import RunOptions

    start = time.perf_counter()
    try:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        options = RunOptions(out=Path(opts["out"]), data_dir=opts["data_dir"], device=opts["device"],
                             progress=False, download=opts["download"], log=lambda line: log(f"[{label}] {line}"),
                             strict=bool(opts.get("strict", False)), tensorboard=bool(opts.get("tensorboard", False)))
        results = run_job(spec, options, kind)
        if not isinstance(results, dict):
            raise LotteryError(f"job kind {kind.name!r} returned {type(results).__name__}, not a results dict")
        return {"ok": True, "results": results, "seconds": time.perf_counter() - start}
    except BaseException as e:  # a crashed experiment (even sys.exit) is reported, never stops the sweep
        if isinstance(e, KeyboardInterrupt):
            raise
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                "seconds": time.perf_counter() - start}


def _local_task(kind: JobKind, spec: JobSpec, opts: dict[str, Any], label: str) -> dict[str, Any]:
    return _execute(kind, spec, opts, label, _emit)


def _ray_task(kind: JobKind, spec: JobSpec, opts: dict[str, Any], label: str, threads: int) -> dict[str, Any]:
    # Ray reuses its worker processes for other tasks, so the thread count is set per task.
    return _execute(kind, spec, opts, label, _emit, threads=threads)


# -- backends --------------------------------------------------------------------------------------
class _SerialBackend:
    """Runs each job in this process, one at a time (debugging, and the reference in tests)."""

    def __init__(self, threads: int, log: Callable[[str], None]):
        self.threads, self.log, self.done = threads, log, []

    def submit(self, entry: "_Entry", opts: dict[str, Any]) -> Any:
        import torch

        before = torch.get_num_threads()
        try:
            self.done.append((entry, _execute(entry.kind, entry.spec, opts, entry.label, self.log, self.threads)))
        finally:
            torch.set_num_threads(before)
        return entry

    def wait(self) -> list[tuple["_Entry", dict[str, Any]]]:
        done, self.done = self.done, []
        return done

    def close(self, cancel: bool = False) -> None:
        pass


class _LocalBackend:
    """A spawn-context process pool; a pool whose worker died is replaced before the next submit."""

    def __init__(self, workers: int, threads: int, log: Callable[[str], None]):
        import multiprocessing

        self.workers, self.threads = workers, threads
        self.ctx = multiprocessing.get_context("spawn")
        self.log = log
        self.pool = None
        self.queue: Any = None
        self.drain: threading.Thread | None = None
        self.futures: dict[Any, _Entry] = {}

    def _drain(self, queue) -> None:
        while True:
            try:
                line = queue.get()
            except (EOFError, OSError, ValueError):
                return
            if line is None:
                return
            self.log(line)

    def _pool(self):
        from concurrent.futures import ProcessPoolExecutor

        if self.pool is None:
            # A fresh log queue per pool: a worker killed while writing may leave the old one locked.
            self._stop_drain()
            self.queue = self.ctx.Queue()
            self.drain = threading.Thread(target=self._drain, args=(self.queue,), daemon=True)
            self.drain.start()
            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=self.ctx,
                                            initializer=_init_local_worker, initargs=(self.threads, self.queue))
        return self.pool

    def _stop_drain(self) -> None:
        if self.queue is None:
            return
        try:
            self.queue.put(None)
            self.drain.join(timeout=5)  # type: ignore[union-attr]
            self.queue.close()
            self.queue.cancel_join_thread()
        except (OSError, ValueError):
            pass
        self.queue = self.drain = None

    def submit(self, entry: "_Entry", opts: dict[str, Any]) -> Any:
        fut = self._pool().submit(_local_task, entry.kind, entry.spec, opts, entry.label)
        self.futures[fut] = entry
        return fut

    def wait(self) -> list[tuple["_Entry", dict[str, Any]]]:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as futures_wait
        from concurrent.futures.process import BrokenProcessPool

        done, _ = futures_wait(list(self.futures), return_when=FIRST_COMPLETED)
        out = []
        broken = False
        for fut in done:
            entry = self.futures.pop(fut)
            try:
                out.append((entry, fut.result()))
            except BrokenProcessPool:
                broken = True
                out.append((entry, {"ok": False, "crashed": True, "seconds": 0.0,
                                    "error": "its worker process died (killed, out of memory, or a crash in native code)"}))
            except Exception as e:  # e.g. an unpicklable argument
                out.append((entry, {"ok": False, "error": f"{type(e).__name__}: {e}", "seconds": 0.0,
                                    "traceback": traceback.format_exc()}))
        if broken:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
        return out

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=not cancel, cancel_futures=True)
            self.pool = None
        self._stop_drain()


def import_ray():
    try:
        import ray
    except ImportError:
        raise LotteryError(
            "the Ray backend needs Ray: pip install 'lottery[ray]' (or pip install 'ray>=2.9')"
        ) from None
    return ray


class _RayBackend:
    """One ``ray.remote`` task per job, with its CPU/GPU request; results gathered with ``ray.wait``."""

    def __init__(self, address: str | None, num_cpus: float, num_gpus: float, threads: int, log):
        ray = import_ray()
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            import logging

            if address:
                ray.init(address=address, logging_level=logging.WARNING)
            else:
                ray.init(include_dashboard=False, logging_level=logging.WARNING)
            self.started = True
        self.remote = ray.remote(_ray_task)
        resources = ray.cluster_resources()
        self.info = {"cluster_cpus": resources.get("CPU", 0.0), "cluster_gpus": resources.get("GPU", 0.0),
                     "nodes": len(ray.nodes())}
        self.num_cpus, self.num_gpus, self.threads, self.log = num_cpus, num_gpus, threads, log
        self.refs: dict[Any, _Entry] = {}

    def submit(self, entry: "_Entry", opts: dict[str, Any]) -> Any:
        ref = self.remote.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=1,
                                  name=entry.label[:100]).remote(entry.kind, entry.spec, opts, entry.label, self.threads)
        self.refs[ref] = entry
        return ref

    def wait(self) -> list[tuple["_Entry", dict[str, Any]]]:
        ready, _ = self.ray.wait(list(self.refs), num_returns=1)
        out = []
        for ref in ready:
            entry = self.refs.pop(ref)
            try:
                out.append((entry, self.ray.get(ref)))
            except Exception as e:  # the task's worker died, or its result could not be fetched
                out.append((entry, {"ok": False, "seconds": 0.0, "error": f"{type(e).__name__}: {one_line(e)}",
                                    "traceback": traceback.format_exc()}))
        return out

    def close(self, cancel: bool = False) -> None:
        if cancel:
            for ref in self.refs:
                try:
                    self.ray.cancel(ref)
                except Exception:
                    pass
        if self.started:
            self.ray.shutdown()


def one_line(e: Any) -> str:
    return " ".join(part.strip() for part in str(e).splitlines() if part.strip())[:2000]


# -- the sweep -------------------------------------------------------------------------------------
@dataclass
class _Entry:
    index: int
    spec: JobSpec
    kind: JobKind
    label: str = ""
    requested: bool = True
    role: str = "job"  # job | dense-reference
    depends_on: int | None = None
    status: str = "pending"  # pending | running | ok | failed
    attempts: int = 0
    isolate: bool = False
    outcome: dict[str, Any] = field(default_factory=dict)
    run_dir: str | None = None
    reused: bool | None = None


@dataclass
class JobOutcome:
    """What became of one job of a sweep."""

    spec: JobSpec
    label: str
    status: str  # ok | failed
    results: dict[str, Any] | None
    error: str | None
    traceback: str | None
    run_dir: str | None
    seconds: float
    requested: bool  # False: a dense reference the sweep added
    role: str
    reused: bool | None  # True: the run folder was already finished before the sweep

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class SweepResult:
    name: str
    path: Path
    backend: str
    workers: int
    threads_per_worker: int
    wall_seconds: float
    outcomes: list[JobOutcome]  # the requested jobs in the order given, then the dense references added

    @property
    def results(self) -> list[dict[str, Any]]:
        """The results dicts of the requested jobs that finished, in the order given."""
        return [o.results for o in self.outcomes if o.requested and o.ok]

    @property
    def failures(self) -> list[JobOutcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def ok(self) -> bool:
        return not self.failures

    def outcome(self, spec: JobSpec) -> JobOutcome:
        for o in self.outcomes:
            if o.spec == spec:
                return o
        raise KeyError(spec)

    @property
    def total_epochs(self) -> float:
        return float(sum(_epochs(o.results) for o in self.outcomes if o.ok and o.results))


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


_SUMMARY_KEYS = ("kind", "method", "mode", "model", "dataset", "seed", "s0", "lam", "level", "density",
                 "test_accuracy", "val_accuracy", "dense_test_accuracy", "epochs", "search_epochs", "wall_seconds")


def _epochs(results: dict[str, Any]) -> float:
    """Every epoch a job's results stand for (an iterative run's summary counts all of its levels)."""
    return _num(results.get("epochs_total", results.get("epochs")))


def _summary(results: dict[str, Any] | None) -> dict[str, Any] | None:
    if results is None:
        return None
    out = {k: results[k] for k in _SUMMARY_KEYS if k in results}
    if isinstance(results.get("levels"), list):  # an iterative run: one line per level
        out["levels"] = [{k: lv.get(k) for k in ("level", "density", "test_accuracy", "epochs")}
                         for lv in results["levels"] if isinstance(lv, dict)]
        out["epochs_total"] = results.get("epochs_total")
        out["sparsest_matching"] = results.get("sparsest_matching")
    return out


def _sweep_name(specs: Sequence[JobSpec], name: str | None) -> str:
    if name:
        clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")
        if not clean:
            raise ConfigError(f"sweep name {name!r} has no usable characters (letters, digits, _ . -)")
        return clean
    # The same set of jobs gets the same name, however it was listed (flag order decides grid order).
    text = json.dumps(sorted(json.dumps(s.to_dict(), sort_keys=True, default=str) for s in set(specs)))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _dedupe_key(entry_spec: JobSpec, kind: JobKind) -> Any:
    # Two specs that name one run folder (e.g. differing only in a field that is not hashed) are one job.
    if kind.folder is not None:
        try:
            return (kind.name, _resolve(kind.folder)(build_job(entry_spec, kind)))
        except Exception:  # a job that cannot be built fails when it runs, with its own message
            pass
    return entry_spec


def run_sweep(
    jobs: Sequence[Any],
    options=None,
    *,
    workers: int = 1,
    backend: str = "local",
    threads_per_worker: int | None = None,
    name: str | None = None,
    ray_address: str | None = None,
    num_cpus: float | None = None,
    num_gpus: float = 0,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> SweepResult:
    """Run many experiments in parallel; return what became of each, failures included.

    ``jobs``: :class:`JobSpec` (or pipeline job objects such as ``CSJob``). ``options``: a
    :class:`~lottery.experiment.RunOptions` (``out``, ``data_dir``, ``device``, ``download``; its
    ``progress`` switches the sweep's bar; workers never draw bars, they log lines prefixed by their job).

    ``backend='local'``: ``workers`` spawned processes, each with ``threads_per_worker`` torch threads
    (default ``max(1, cpus // workers)``). ``backend='ray'``: each job a Ray task asking for ``num_cpus``
    (default ``threads_per_worker``, else 1; its torch threads default to it) and ``num_gpus`` (> 0: the jobs run on ``cuda``, the GPU Ray
    gives each task); ``ray_address`` joins a running cluster (its nodes must see ``options.out`` and
    have lottery installed), otherwise a local Ray is started (and stopped at the end); an already
    initialised Ray is used as it is. ``backend='serial'``: one job at a time in this process.
    With the local backend every worker uses ``options.device``; to spread jobs over several GPUs use Ray.
    """
    from lottery.experiment import RunOptions
    from lottery.io import write_json

    if backend not in BACKENDS:
        raise ConfigError(f"unknown sweep backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    if threads_per_worker is not None and (not isinstance(threads_per_worker, int) or threads_per_worker < 1):
        raise ConfigError(f"threads_per_worker must be a positive integer, got {threads_per_worker!r}")
    if num_gpus < 0 or (num_cpus is not None and num_cpus <= 0):
        raise ConfigError("num_cpus must be positive and num_gpus non-negative")
    if ray_address and backend != "ray":
        raise ConfigError("ray_address applies only to backend='ray'")
    if backend == "ray":
        import_ray()  # fail before any work when Ray is missing
    options = options or RunOptions()
    specs = [spec_from_job(j) for j in jobs]
    if not specs:
        raise ConfigError("the sweep has no jobs")
    if backend == "serial":
        workers = 1
    if backend == "ray":
        # One CPU per task unless asked otherwise: Ray then runs as many at once as the cluster has CPUs.
        if num_cpus is None:
            num_cpus = float(threads_per_worker or 1)
        if threads_per_worker is None:
            threads_per_worker = max(1, int(num_cpus))
    elif threads_per_worker is None:
        threads_per_worker = default_threads_per_worker(workers)
    show = options.progress if progress is None else progress
    from tqdm.auto import tqdm

    log = log or options.log or tqdm.write

    # -- the job list: requested jobs (deduplicated), then the dense references they share ---------
    entries: list[_Entry] = []
    by_key: dict[Any, int] = {}

    def add(spec: JobSpec, requested: bool, role: str) -> int:
        kind = get_kind(spec.kind)
        key = _dedupe_key(spec, kind)
        if key in by_key:
            e = entries[by_key[key]]
            if e.spec != spec:
                a, b = job_labels([e.spec, spec])
                raise ConfigError(
                    f"two jobs of the sweep would write one run folder ({key[1] if isinstance(key, tuple) else key}): "
                    f"{a} / {b}; they differ only in fields that do not name a run (such as IMP's levels): keep one"
                )
            e.requested = e.requested or requested
            if role == "dense-reference":
                e.role = role
            return e.index
        entries.append(_Entry(len(entries), spec, kind, requested=requested, role=role))
        by_key[key] = len(entries) - 1
        return len(entries) - 1

    for spec in specs:
        add(spec, True, "job")
    for e in list(entries):
        dense = dense_reference_spec(e.spec)
        if dense is not None:
            e.depends_on = add(dense, False, "dense-reference")
    for e, label in zip(entries, job_labels([e.spec for e in entries])):
        e.label = label
        if e.kind.folder is not None:
            try:
                folder = Path(options.out) / _resolve(e.kind.folder)(build_job(e.spec, e.kind))
                e.run_dir = str(folder)
                e.reused = (folder / "results.json").exists()
            except Exception:  # an unbuildable job fails when it runs, with its own message
                pass

    sweep_name = _sweep_name(specs, name)
    Path(options.out).mkdir(parents=True, exist_ok=True)
    record_path = Path(options.out) / f"sweep_{sweep_name}.json"
    opts = _options_state(options)
    if backend == "ray" and num_gpus > 0:
        # Ray gives each task its GPU(s) (CUDA_VISIBLE_DEVICES); the driver itself may have none.
        opts["device"] = "cuda"
    # Dense references first: their dependents can only start once they are finished.
    queue = sorted(entries, key=lambda e: (e.role != "dense-reference", e.index))
    start_time = time.time()
    t0 = time.perf_counter()

    backend_info: dict[str, Any] = {}

    def record(state: str) -> None:
        write_json(record_path, _record(sweep_name, state, backend, workers, threads_per_worker, backend_info,
                                        start_time, time.perf_counter() - t0, entries))

    n_failed = 0

    def finish(e: _Entry, outcome: dict[str, Any]) -> None:
        nonlocal n_failed
        e.outcome = outcome
        e.status = "ok" if outcome.get("ok") else "failed"
        if e.status == "ok" and isinstance(outcome["results"].get("run_dir"), str):
            e.run_dir = outcome["results"]["run_dir"]
        if e.status == "failed":
            n_failed += 1
            log(f"FAILED {e.label}: {one_line(outcome.get('error'))}")
        bar.update(1)
        bar.set_postfix(failed=n_failed)
        record("running")

    if backend == "local":
        runner: Any = _LocalBackend(workers, threads_per_worker, log)
        cap = workers
    elif backend == "ray":
        runner = _RayBackend(ray_address, float(num_cpus), float(num_gpus), threads_per_worker, log)
        cap = len(entries)  # Ray queues the tasks by their resource requests
        # The tasks that can run at once on the cluster: Ray's counterpart of the local worker count.
        by_cpu = runner.info["cluster_cpus"] // num_cpus
        by_gpu = runner.info["cluster_gpus"] // num_gpus if num_gpus else by_cpu
        workers = max(1, int(min(by_cpu, by_gpu)))
        backend_info = {"address": ray_address, "num_cpus": num_cpus, "num_gpus": num_gpus, **runner.info}
    else:
        runner = _SerialBackend(threads_per_worker, log)
        cap = 1
    bar = tqdm(total=len(entries), desc=f"sweep {sweep_name}", unit="job", disable=not show, dynamic_ncols=True)
    log(f"sweep {sweep_name}: {len(entries)} jobs ({sum(e.role == 'dense-reference' for e in entries)} dense "
        f"references first), backend {backend}, {workers} at a time x {threads_per_worker} threads; "
        f"record: {record_path}")
    record("running")
    cancelled = True
    try:
        in_flight = 0
        isolated = False  # a job retried after its pool broke runs alone, so a second crash is its own
        while True:
            for e in queue:
                if in_flight >= cap or isolated:
                    break
                if e.status != "pending" or (e.isolate and in_flight > 0):
                    continue
                if e.depends_on is not None:
                    dep = entries[e.depends_on]
                    if dep.status in ("pending", "running"):
                        continue
                    if dep.status == "failed":
                        finish(e, {"ok": False, "seconds": 0.0,
                                   "error": f"its dense reference ({dep.label}) failed: {one_line(dep.outcome.get('error'))}"})
                        continue
                e.status = "running"
                e.attempts += 1
                runner.submit(e, opts)
                in_flight += 1
                isolated = e.isolate
            if in_flight == 0:
                break
            for e, outcome in runner.wait():
                in_flight -= 1
                if e.isolate:
                    isolated = False
                if outcome.get("crashed") and e.attempts < 2:
                    # The pool broke, taking every job in it: the culprit is unknown, so each is retried
                    # once, alone. An innocent job then finishes; the culprit breaks its pool again.
                    log(f"retrying {e.label} alone: {outcome['error']}")
                    e.status = "pending"
                    e.isolate = True
                    continue
                finish(e, outcome)
        cancelled = False
    finally:
        bar.close()
        runner.close(cancel=cancelled)
        record("interrupted" if cancelled else "finished")

    outcomes = [
        JobOutcome(e.spec, e.label, e.status, e.outcome.get("results"), e.outcome.get("error"),
                   e.outcome.get("traceback"), e.run_dir, float(e.outcome.get("seconds", 0.0)), e.requested, e.role,
                   e.reused)
        for e in sorted(entries, key=lambda e: (not e.requested, e.index))
    ]
    result = SweepResult(sweep_name, record_path, backend, workers, threads_per_worker, time.perf_counter() - t0, outcomes)
    if result.failures:
        log(f"sweep {sweep_name}: {len(result.failures)} of {len(entries)} jobs failed:")
        for o in result.failures:
            log(f"  {o.label}: {one_line(o.error)}")
    return result


def _record(name, state, backend, workers, threads, backend_info, start_time, wall, entries) -> dict:
    ok = [e for e in entries if e.status == "ok"]
    epochs = sum(_epochs(e.outcome["results"]) for e in ok)
    fresh = sum(_epochs(e.outcome["results"]) for e in ok if not e.reused)
    return {
        "name": name,
        "state": state,
        "backend": backend,
        "workers": workers,  # ray: the tasks the cluster can run at once with this CPU/GPU request
        "threads_per_worker": threads,
        **({"ray": backend_info} if backend == "ray" else {}),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start_time)),
        "wall_seconds": wall,
        "jobs_total": len(entries),
        "jobs_ok": len(ok),
        "jobs_failed": sum(e.status == "failed" for e in entries),
        # Epochs of every finished job's results (dense references once); the second figure leaves out
        # runs that were already finished before this sweep started.
        "total_epochs": epochs,
        "epochs_trained_in_this_sweep": fresh,
        "job_seconds": sum(_num(e.outcome.get("seconds")) for e in entries),
        "jobs": [
            {
                "label": e.label,
                "kind": e.spec.kind,
                "seed": e.spec.seed,
                "role": e.role,
                "requested": e.requested,
                "hparams": {n: g.non_default_dict() for n, g in e.spec.groups},
                **({"extra": dict(e.spec.extra)} if e.spec.extra else {}),
                "run_dir": e.run_dir,
                "status": e.status,
                "attempts": e.attempts,
                "reused": e.reused,
                "seconds": e.outcome.get("seconds"),
                "results": _summary(e.outcome.get("results")),
                **({"error": e.outcome.get("error"), "traceback": e.outcome.get("traceback")} if e.status == "failed" else {}),
            }
            for e in entries
        ],
    }
