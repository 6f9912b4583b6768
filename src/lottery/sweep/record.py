"""What a sweep reports: each job's outcome, the sweep's result, and the ``sweep_<name>.json`` record."""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lottery.errors import ConfigError
from lottery.sweep.kinds import JobKind, _resolve
from lottery.sweep.spec import JobSpec, build_job

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
    stacked: bool = False  # a member of a planned stack (lottery.sweep.stacks) that has not finished
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
