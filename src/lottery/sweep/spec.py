"""Sweep job specs: frozen, picklable ``(kind, hparams groups, seed)``; grids of them, and their labels."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from lottery.errors import ConfigError
from lottery.sweep.kinds import GROUP_CLASSES, KINDS, JobKind, _resolve, get_kind

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
