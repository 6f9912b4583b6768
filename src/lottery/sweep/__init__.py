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
results, the epochs trained, the wall time, the backend and the number of workers. Runs that can share
one stacked network (dense seeds, CS searches: :mod:`lottery.sweep.stacks`) run as stacks, each stack one
job of the backend (``stack``, default ``'auto'``).

Scripts that call :func:`run_sweep` with the local backend need the usual ``if __name__ == "__main__":``
guard: workers are started with the *spawn* method (a forked PyTorch process can deadlock).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from lottery.errors import ConfigError, LotteryError  # noqa: F401  (LotteryError: re-exported)
from lottery.sweep.backends import (  # noqa: F401
    BACKENDS, JobTask, _LocalBackend, _options_state, _RayBackend, _SerialBackend, _execute, clean_ray_line,
    import_ray, one_line,
)
from lottery.sweep.kinds import (  # noqa: F401
    GROUP_CLASSES, KINDS, JobKind, _resolve, _run_folder, available_kinds, get_kind, kind_available, register_kind,
)
from lottery.sweep.record import (  # noqa: F401
    JobOutcome, SweepResult, _dedupe_key, _Entry, _record, _summary, _sweep_name,
)
from lottery.sweep.spec import (  # noqa: F401
    JobSpec, build_job, default_threads_per_worker, dense_reference_spec, expand_grid, job_labels, make_spec, run_job,
    spec_from_job,
)
from lottery.sweep.stacks import (  # noqa: F401
    STACK_KINDS, Stack, StackKind, finish_stack, plan_stacks, register_stack_kind, split_evenly,
)

__all__ = [
    "BACKENDS",
    "GROUP_CLASSES",
    "JobKind",
    "JobOutcome",
    "JobSpec",
    "KINDS",
    "STACK_KINDS",
    "StackKind",
    "SweepResult",
    "available_kinds",
    "build_job",
    "clean_ray_line",
    "default_threads_per_worker",
    "dense_reference_spec",
    "expand_grid",
    "get_kind",
    "import_ray",
    "job_labels",
    "kind_available",
    "make_spec",
    "register_kind",
    "register_stack_kind",
    "run_job",
    "run_sweep",
    "spec_from_job",
]


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
    stack: int | str = "auto",
) -> SweepResult:
    """Run many experiments in parallel; return what became of each, failures included.

    ``jobs``: :class:`JobSpec` (or pipeline job objects such as ``CSJob``). ``options``: a
    :class:`~lottery.experiment.RunOptions` (``out``, ``data_dir``, ``device``, ``download``; its
    ``progress`` switches the sweep's bar, drawn only when stderr is a terminal; workers never draw bars,
    they log lines prefixed by their job).

    ``backend='local'``: ``workers`` spawned processes, each with ``threads_per_worker`` torch threads
    (default ``max(1, cpus // workers)``). ``backend='ray'``: each job a Ray task asking for ``num_cpus``
    (default ``threads_per_worker``, else 1; its torch threads default to it) and ``num_gpus`` (> 0: the jobs run on ``cuda``, the GPU Ray
    gives each task); ``ray_address`` joins a running cluster (its nodes must see ``options.out`` and
    have lottery installed), otherwise a local Ray is started (and stopped at the end); an already
    initialised Ray is used as it is. ``backend='serial'``: one job at a time in this process.
    With the local backend every worker uses ``options.device``; to spread jobs over several GPUs use Ray.

    ``stack``: runs that can share a stacked network (:mod:`lottery.sweep.stacks`: dense runs that differ
    only in their seed, CS ticket searches that differ only in ``s0``, ``lam`` and seed; both sharing one
    data order, ``TrainingHparams.data_order_seed``) run in stacks of at most ``stack``, each stack one job
    of the backend (a worker, a Ray task), writing the run folders their unstacked runs write; dense stacks
    before the CS stacks that start from them. Runs that cannot share a stack (one line per reason), and
    members a stack does not take, run as usual. ``'auto'`` (default): each group's stack size from the
    device, the model's size and, on the CPU, the number of workers, so that every worker gets a stack
    (:func:`lottery.experiment.auto_stack_size`), said in one line; a group of one, or as few runs as
    workers on the CPU, runs unstacked. ``1``: no stacking.
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
    if stack != "auto" and (not isinstance(stack, int) or isinstance(stack, bool) or stack < 1):
        raise ConfigError(f"stack must be a positive integer or 'auto', got {stack!r}")
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
    # disable=None: the bar only on a terminal; into a pipe or a file it would be noise among the log lines.
    bar = tqdm(total=len(entries), desc=f"sweep {sweep_name}", unit="job", disable=None if show else True,
               dynamic_ncols=True)
    log(f"sweep {sweep_name}: {len(entries)} jobs ({sum(e.role == 'dense-reference' for e in entries)} dense "
        f"references first), backend {backend}, {workers} at a time x {threads_per_worker} threads; "
        f"record: {record_path}")
    record("running")
    cancelled = True
    try:
        stacks = plan_stacks(entries, stack, options, log, workers) if stack == "auto" or stack > 1 else []
        # Dense references (and stacks of them) first: their dependents can only start once they are
        # finished; a stack before the jobs of its level, as it takes longest.
        queue: list[Any] = sorted(
            [*stacks, *entries],
            key=lambda it: ((max(e.role != "dense-reference" for e in it.members), 0, it.members[0].index)
                            if isinstance(it, Stack) else (it.role != "dense-reference", 1, it.index)))
        in_flight = 0
        isolated = False  # a job retried after its pool broke runs alone, so a second crash is its own
        while True:
            for item in queue:
                if in_flight >= cap or isolated:
                    break
                if isinstance(item, Stack):
                    if item.ready(entries):
                        log(item.start())
                        runner.submit(item, item.task(), opts)
                        in_flight += 1
                    continue
                e = item
                if e.status != "pending" or e.stacked or (e.isolate and in_flight > 0):
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
                runner.submit(e, JobTask(e.kind, e.spec), opts)
                in_flight += 1
                isolated = e.isolate
            if in_flight == 0:
                break
            for item, outcome in runner.wait():
                in_flight -= 1
                if isinstance(item, Stack):
                    finish_stack(item, outcome, finish, log)
                    continue
                e = item
                if e.isolate:
                    isolated = False
                if outcome.get("crashed") and not e.isolate:
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
