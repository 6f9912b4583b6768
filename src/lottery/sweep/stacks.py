"""Stacks as sweep jobs: K runs trained as ONE stacked network (:mod:`lottery.engine.stacking`), which the
sweep's backends schedule like any job.

Why a stack is a job: a local pool's worker, a Ray task or the serial backend runs a whole stack, so
``--workers 2 --stack 4`` with 8 stackable runs trains two stacks of 4 side by side, one per worker (a stack
trained in the sweep's own process, before the workers start, left every worker but one idle).

A *stack kind* (:class:`StackKind`) says which sweep job kinds (:mod:`lottery.sweep.kinds`) stack and how:

* ``key(job)``: a hashable; only jobs with the same key share a stack;
* ``refusal(jobs, options)`` (optional): why these jobs cannot share a stack (one line), or None; asked of
  each job alone when the sweep plans its stacks, so a job that never stacks runs unstacked after one line;
* ``run(jobs, options)``: run the jobs as one stack, writing each one's run folder as its unstacked run
  does; returns per job its results dict, ``None`` (the stack did not take it: the sweep runs it unstacked,
  as a job of its own) or an exception (it failed; the others' results stand).

Each may be given as a ``"module:attr"`` string, imported only where a stack runs: the kind then pickles to
a spawned worker or a Ray task as it is, and a missing module costs nothing until a stack of its kind runs.
The built-in kinds: ``train`` (dense runs that differ only in their seed,
:func:`lottery.experiment.train_dense_stacked`), ``cs`` (CS ticket searches that differ only in ``s0``,
``lam`` and seed, :func:`lottery.pipelines.cs_stacked.run_cs_stacked`) and ``imp`` (IMP replicates that
differ only in their seed, :func:`lottery.pipelines.imp_stacked.run_imp_stacked`). A new kind is one
call, e.g. (``kinds`` defaults to the kind's own name)::

    register_stack_kind("imp", key="lottery.pipelines.imp_stacked:imp_stack_key",
                        refusal="lottery.pipelines.imp_stacked:imp_stack_refusal",
                        run="lottery.sweep.stacks:run_imp_stack", noun="IMP searches")

The sweep (:func:`lottery.sweep.run_sweep`) asks :func:`plan_stacks` for its stacks, submits a stack's
:class:`StackTask` once every member's dense reference has finished (a member whose reference failed leaves
the stack and fails as a job would), and hands the stack's outcome to :func:`finish_stack`, which records
each member's outcome. Members the stack returned None for go back to the sweep's queue and run unstacked;
so do all members of a stack that raised or whose worker died (the stack's own failure, one line). A killed
sweep started again plans its stacks anew: finished members are reused (their folders are finished), the
others resume from their checkpoints, stacked or not.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from lottery.errors import ConfigError, LotteryError
from lottery.sweep.backends import one_line
from lottery.sweep.kinds import JobKind, _resolve
from lottery.sweep.record import _Entry
from lottery.sweep.spec import JobSpec, build_job


@dataclass(frozen=True)
class StackKind:
    """How jobs of the sweep's job kinds ``kinds`` stack (see the module docstring). ``noun``: what the log
    calls its members ("CS searches"); ``alone``: the log's hint why a job found no other to stack with."""

    name: str
    kinds: tuple[str, ...]
    key: Callable[[Any], Any] | str
    run: Callable[..., list[Any]] | str
    refusal: Callable[..., str | None] | str | None = None
    noun: str = "runs"
    alone: str = "share their stack key with no other and run unstacked"


STACK_KINDS: dict[str, StackKind] = {}


def register_stack_kind(name: str, *, key: Callable[[Any], Any] | str, run: Callable[..., list[Any]] | str,
                        refusal: Callable[..., str | None] | str | None = None, kinds: Sequence[str] | None = None,
                        noun: str | None = None, alone: str | None = None, replace: bool = False) -> StackKind:
    """Add a stack kind: jobs of ``kinds`` (default: ``(name,)``) with one ``key`` run ``run`` as one stack.
    A job kind stacks in one way only; ``replace=True`` overwrites a kind of the same name."""
    kinds = tuple(kinds) if kinds is not None else (name,)
    if name in STACK_KINDS and not replace:
        raise ConfigError(f"stack kind {name!r} is already registered")
    for other in STACK_KINDS.values():
        taken = set(other.kinds) & set(kinds)
        if other.name != name and taken:
            raise ConfigError(f"job kind(s) {', '.join(sorted(taken))} already stack as {other.name!r}")
    kind = StackKind(name, kinds, key, run, refusal, noun or f"{name} runs", *([alone] if alone else []))
    STACK_KINDS[name] = kind
    return kind


# -- the built-in kinds ------------------------------------------------------------------------------
def dense_stack_key(job) -> tuple:
    """Dense runs stack when they differ only in their seed and share one data order."""
    from lottery.experiment import data_order_of

    return (job.data, job.model, job.training, data_order_of(job.training, job.seed))


def run_dense_stack(jobs: list[Any], options) -> list[dict[str, Any]]:
    from lottery.experiment import train_dense_stacked

    # wait_for_lock: a dense reference's folder may be held a moment by a job reusing it
    return train_dense_stacked(jobs, options, wait_for_lock=True)


def run_cs_stack(jobs: list[Any], options) -> list[Any]:
    from lottery.pipelines.cs_stacked import run_cs_stacked

    # fallback=False: the members it does not take come back as None and the sweep runs them as jobs
    return run_cs_stacked(jobs, options, raise_errors=False, fallback=False)


def run_imp_stack(jobs: list[Any], options) -> list[Any]:
    from lottery.pipelines.imp_stacked import run_imp_stacked

    # fallback=False: the members it does not take come back as None and the sweep runs them as jobs
    return run_imp_stacked(jobs, options, raise_errors=False, fallback=False)


register_stack_kind("train", key="lottery.sweep.stacks:dense_stack_key", run="lottery.sweep.stacks:run_dense_stack",
                    noun="dense runs", alone="share their data order with no other and run unstacked "
                    "(runs of different seeds share one only with --data-order-seed)")
register_stack_kind("cs", kinds=("cs", "cs-prune"), key="lottery.pipelines.cs_stacked:stack_key",
                    refusal="lottery.pipelines.cs_stacked:stack_refusal", run="lottery.sweep.stacks:run_cs_stack",
                    noun="CS searches", alone="share their model, recipe and data order with no other and run "
                    "unstacked (searches of different seeds share one only with --data-order-seed)")
register_stack_kind("imp", key="lottery.pipelines.imp_stacked:imp_stack_key",
                    refusal="lottery.pipelines.imp_stacked:imp_stack_refusal", run="lottery.sweep.stacks:run_imp_stack",
                    noun="IMP searches", alone="share their model, recipe, levels and data order with no other and "
                    "run unstacked (replicates of different seeds share one only with --data-order-seed)")


# -- the worker's side -------------------------------------------------------------------------------
@dataclass(frozen=True)
class StackTask:
    """A stack as a backend runs it: frozen and picklable (kinds, specs; no job objects, no functions that
    only the parent has), called in the worker with its ``RunOptions``. Returns per member
    ``{"ok": True, "results": ...}``, ``{"ok": False, "error": ...}`` or None (not stacked); exceptions become
    strings here, since a member's exception may not pickle back to the parent."""

    kind: StackKind
    members: tuple[tuple[JobKind, JobSpec], ...]

    def __call__(self, options) -> list[dict[str, Any] | None]:
        jobs = [build_job(spec, kind) for kind, spec in self.members]
        out = list(_resolve(self.kind.run)(jobs, options))
        if len(out) != len(jobs):
            raise LotteryError(f"stack kind {self.kind.name!r} returned {len(out)} results for {len(jobs)} members")
        return [_member_outcome(r) for r in out]


def _member_outcome(r: Any) -> dict[str, Any] | None:
    if r is None:
        return None
    if isinstance(r, BaseException):
        return {"ok": False, "error": f"{type(r).__name__}: {r}",
                "traceback": "".join(traceback.format_exception(type(r), r, r.__traceback__))}
    if not isinstance(r, dict):
        return {"ok": False, "error": f"the stack returned {type(r).__name__}, not a results dict"}
    return {"ok": True, "results": r}


# -- the sweep's side --------------------------------------------------------------------------------
@dataclass
class Stack:
    """One planned stack of the sweep: its members (entries the sweep's own queue skips while
    ``entry.stacked``) and its state, ``pending`` | ``running`` | ``done``."""

    kind: StackKind
    members: list[_Entry]
    status: str = "pending"
    label: str = field(default="", init=False)

    def __post_init__(self) -> None:
        for e in self.members:
            e.stacked = True
        self.label = f"stack {self.members[0].label} +{len(self.members) - 1}"

    def task(self) -> StackTask:
        return StackTask(self.kind, tuple((e.kind, e.spec) for e in self.members))

    def ready(self, entries: list[_Entry]) -> bool:
        """Whether the stack can start: every member's dense reference has finished. Members whose
        reference failed leave the stack (the sweep fails them as it fails such a job); a stack left with
        fewer than two members is no stack: its members become jobs of their own."""
        if self.status != "pending":
            return False
        deps = [entries[e.depends_on] for e in self.members if e.depends_on is not None]
        if any(d.status in ("pending", "running") for d in deps):
            return False
        for e in list(self.members):
            if e.depends_on is not None and entries[e.depends_on].status == "failed":
                self.release([e])
        if len(self.members) < 2:
            self.release(self.members)
            self.status = "done"
            return False
        return True

    def release(self, members: list[_Entry]) -> None:
        for e in list(members):
            e.stacked = False
            self.members.remove(e)

    def start(self) -> str:
        """Mark the stack and its members running; the log line that says so."""
        self.status = "running"
        for e in self.members:
            e.status = "running"
            e.attempts += 1
        return f"stack: {len(self.members)} {self.kind.noun} as one ({', '.join(e.label for e in self.members)})"


def split_evenly(items: list[Any], size: int) -> list[list[Any]]:
    """``items`` cut into parts of at most ``size``, as even as possible, in order: 9 runs in stacks of at
    most 8 are 5 + 4, not 8 + 1 (a stack of one is no stack), and 8 in stacks of at most 4 are 4 + 4."""
    if not items:
        return []
    n = -(-len(items) // max(1, size))  # parts
    per = -(-len(items) // n)
    return [items[i:i + per] for i in range(0, len(items), per)]


def plan_stacks(entries: list[_Entry], size: int | str, options, log: Callable[[str], None],
                workers: int = 1) -> list[Stack]:
    """The sweep's stacks: its pending, not yet finished jobs grouped by stack kind and key, each group cut
    evenly (:func:`split_evenly`) into stacks of at most ``size`` (``'auto'``:
    :func:`lottery.experiment.auto_stack_size` for the group, given ``workers`` stacks at once, said in one
    line). In the registry's order, so dense stacks come before the CS stacks that start from them. Jobs
    refused or alone are left out, with one line per reason; so are jobs that cannot be built (they fail
    when they run, with their own message)."""
    stacks: list[Stack] = []
    for kind in STACK_KINDS.values():
        groups: dict[Any, list[tuple[_Entry, Any]]] = {}
        refused: dict[str, int] = {}
        for e in entries:
            if e.kind.name not in kind.kinds or e.status != "pending" or e.reused or e.stacked:
                continue
            try:
                job = build_job(e.spec, e.kind)
                why = _resolve(kind.refusal)([job], options) if kind.refusal is not None else None
                key = _resolve(kind.key)(job)
            except Exception:
                continue
            if why is not None:
                refused[why] = refused.get(why, 0) + 1
                continue
            groups.setdefault(key, []).append((e, job))
        title = kind.noun.split()[0]
        for why, n in refused.items():
            log(f"stack: {n} {title} job(s) run unstacked: {why}")
        alone = sum(len(g) for g in groups.values() if len(g) == 1)
        if alone:
            log(f"stack: {alone} {title} job(s) {kind.alone}")
        for group in groups.values():
            if len(group) < 2:
                continue
            k = size
            if size == "auto":
                from lottery.experiment import auto_stack_size, build_model, load_data

                job = group[0][1]
                k, why = auto_stack_size(build_model(job.model, load_data(job.data, options), job.seed),
                                         options.device, len(group), workers)
                log(f"stack: {why}")
            stacks += [Stack(kind, [e for e, _ in chunk]) for chunk in split_evenly(group, int(k)) if len(chunk) > 1]
    return stacks


def finish_stack(stack: Stack, outcome: dict[str, Any], finish: Callable[[_Entry, dict[str, Any]], None],
                 log: Callable[[str], None]) -> None:
    """Record what became of ``stack``'s members (``finish``: the sweep's record of one job's outcome), each
    with its share of the stack's time. Members it did not take, and all of a stack that failed as a whole
    (raised, or its worker died), go back to the sweep's queue and run unstacked."""
    stack.status = "done"
    members = list(stack.members)
    if not outcome.get("ok"):
        log(f"stack: {stack.label} failed ({one_line(outcome.get('error'))}); its {len(members)} members run "
            "unstacked")
        back = members
    else:
        seconds = float(outcome.get("seconds", 0.0)) / len(members)
        back = []
        for e, r in zip(members, outcome["results"]):
            if r is None:
                back.append(e)
                e.attempts -= 1  # not run: the unstacked run is its first attempt
            else:
                finish(e, {**r, "seconds": seconds})
        if back:
            log(f"stack: {len(back)} of {len(members)} {stack.kind.noun} not stacked run unstacked "
                f"({', '.join(e.label for e in back)})")
    for e in back:
        e.status = "pending"
    stack.release(members)
