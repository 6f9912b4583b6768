"""K IMP replicates as one stacked network in one process (issue 23).

Why: the replicates of an IMP experiment (the same recipe, pruning rate, levels and rewind point; only the
initialisation's seed differs) are K independent runs of small networks; on a CPU a LeNet step is mostly
per-step overhead, which a stack (lottery.engine.stacking) pays once for all K, and the K runs share the
data batches.

Members of one stack share the model, the data, the training recipe, the IMP hparams and the data order
(``TrainingHparams.data_order_seed``, which their hparams then state: replicates of different seeds need
it); they differ in the seed of the initialisation. Level 0 trains the K dense networks as one stack and
takes each member's rewind snapshot at k. Every later level prunes each member on its own: the same
:func:`lottery.methods.imp.magnitude_prune` call on the member's own level L-1 weights and mask that an
unstacked run makes (:func:`lottery.pipelines.imp._prune_level`), rewinds each member to its own snapshot
and retrains all members from k as one stack, each under its own hard mask.

Every member's run folder is the one :func:`lottery.pipelines.imp.run_imp` writes (hparams.json,
rewind.safetensors, level_L/{mask.safetensors, mask.json, model.safetensors, history.json, results.json},
metrics.csv, results.json, accuracy_vs_density.png), so ``lottery report``, reuse and resume read it as an
unstacked run; the summary adds ``stack: {size, wall_seconds, data_order}`` and each level's history.json
``stack: {size, wall_seconds}``; ``wall_seconds`` is the member's share of the stack's time. Stacks keep no
mid-level checkpoint: a killed stack resumes as a stack from the last level every member finished; members
with different finished levels, or with a checkpoint of an unstacked run, finish unstacked (run_imp).

Not stacked (one line, then the members run one by one): IMP-C (``variant='continue'``), LRR,
fine-tuning and other non-IMP jobs, runs under torchrun, and networks
:func:`lottery.engine.stacking.stack` refuses (Dropout, layers it does not know).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

import torch

from lottery import masking
from lottery.engine.stacking import StackedModel, StackedTrainer, StackingError, _stack_tensors, stack, unstack_state
from lottery.errors import CheckpointError, NumericalError
from lottery.experiment import (
    RunOptions, StackedMetricsCSV, build_model_without_data, data_order_of, finished_results, folder_lock, log_line,
    prepare_run_folder, write_metrics_csv, write_results,
)
from lottery.io import load_tensors, save_tensors, write_json
from lottery.masks import Mask
from lottery.methods.cs import EnforceMaskCallback
from lottery.methods.imp import derived_seed
from lottery.pipelines.cs_stacked import _one_line, _StackedSnapshot, finish_members
from lottery.pipelines.imp import (
    IMPJob, _finish_level, _finish_level_zero, _finish_report, _imp_plan, _level, _level_head, _level_zero,
    _levels_folder, _open_levels, _prune_level, _summary, _ticket_epochs, run_imp,
)
from lottery.pipelines.stages import _masked_state


def imp_stack_key(job: Any) -> tuple:
    """What the members of one stack share: everything but the initialisation's seed (the data order,
    which the seed gives unless ``data_order_seed`` is set, is part of it). Jobs with equal keys may stack."""
    imp = getattr(job, "imp", None)
    return (type(job).__name__, getattr(job, "kind", None), job.data, job.model, job.training, imp,
            data_order_of(job.training, job.seed))


def imp_stack_refusal(jobs: Sequence[Any], options: RunOptions) -> str | None:
    """Why ``jobs`` cannot run as one stack of IMP replicates (one line), or None."""
    from lottery.distributed import is_distributed

    jobs = list(jobs)
    if not jobs:
        return "no jobs"
    if any(not isinstance(j, IMPJob) for j in jobs):
        return "only IMP searches are stacked; LRR, fine-tuning and other jobs run one by one"
    if any(j.imp.variant != "rewind" for j in jobs):
        return ("IMP-C (variant continue) is not stacked: its continued runs restart the schedule from the "
                "pruned weights; only IMP with rewinding is")
    if is_distributed():
        return "stacked training under torchrun (data-parallel) is not supported"
    if len({imp_stack_key(j) for j in jobs}) > 1:
        if len({data_order_of(j.training, j.seed) for j in jobs}) > 1:
            return ("the members do not share one data order: set TrainingHparams.data_order_seed "
                    "(--train.data_order_seed) to stack IMP replicates of different seeds")
        return "the members differ in more than their seed"
    if len({j.seed for j in jobs}) < len(jobs):
        return "two members have the same seed"
    try:  # the architecture only (weights do not matter): the stacked path refuses Dropout, unknown layers
        stack([build_model_without_data(jobs[0].data, jobs[0].model) for _ in range(2)])
    except StackingError as e:
        return _one_line(e)
    return None


def _finished_levels(folder: Path, levels: int, options: RunOptions) -> int | None:
    """How many levels of ``folder`` are finished, in order from level 0 (0: start from scratch), or None
    when the run can only go on unstacked: an unstacked run's checkpoint is there (run_imp resumes from
    it), or a level after the finished ones already has its trained network. Why: stacked members resume
    together from one level, and a stack keeps no checkpoint of its own."""
    if any(folder.glob("level_*/*checkpoint.safetensors")):
        return None
    n = 0
    while n <= levels and finished_results(folder / f"level_{n}" / "results.json", options) is not None:
        n += 1
    if n and not (folder / "rewind.safetensors").exists():
        return None
    if any((folder / f"level_{m}" / "model.safetensors").exists() for m in range(n, levels + 1)):
        return None
    return n


def run_imp_stacked(jobs: Sequence[IMPJob], options: RunOptions, *, raise_errors: bool = False,
                    fallback: bool = True) -> list[Any]:
    """Run IMP replicates (IMP jobs that differ only in their seed, sharing the data order) as one stacked
    network, writing each member's run folder as :func:`lottery.pipelines.imp.run_imp` does. Members whose
    levels are all finished are reused; members the stack cannot take (see the module docstring) run through
    ``run_imp``.

    Returns each job's summary (run_imp's), in order. ``fallback=False`` (a sweep, which has workers for
    them): members that would run unstacked are left out, ``None`` in their place. ``raise_errors=False``: a
    member that fails gets its exception in its place and the others go on; otherwise the first is raised
    once every member has finished."""
    jobs = list(jobs)
    out: list[Any] = [None] * len(jobs)
    why = imp_stack_refusal(jobs, options) if len(jobs) > 1 else "a single IMP search"
    alone: list[int] = []
    groups: list[tuple[int, list[int]]] = []
    if why is not None:
        if len(jobs) > 1:
            log_line(options, f"stacking refused: {why}; running the {len(jobs)} IMP searches one by one")
        alone = list(range(len(jobs)))
    else:
        folders = []
        by_level: dict[int | None, list[int]] = {}
        for i, job in enumerate(jobs):
            folder, desc = _levels_folder(job, _imp_plan(job), options)
            prepare_run_folder(folder, desc)  # refuses a folder of another configuration before anything runs
            folders.append(folder)
            n = _finished_levels(folder, job.imp.levels, options)
            if n == job.imp.levels + 1:
                alone.append(i)  # every level finished: run_imp only reads it and writes the summary
            else:
                by_level.setdefault(n, []).append(i)
        for n, group in by_level.items():
            if n is None or len(group) < 2:
                if n != 0:
                    what = "an unstacked checkpoint or a partly trained level" if n is None else f"{n} finished level(s)"
                    log_line(options, f"stack: {len(group)} IMP search(es) with {what} on disk finish unstacked")
                alone += group
            else:
                groups.append((n, group))
    for n, group in groups:
        try:
            with ExitStack() as locks:
                for i in group:
                    locks.enter_context(folder_lock(folders[i]))
                results = _run_stack([jobs[i] for i in group], options, start=n)
            for i, r in zip(group, results):
                out[i] = r
        except StackingError as e:
            log_line(options, f"stacking refused: {_one_line(e)}; running the {len(group)} IMP searches one by one")
            alone += group
        except NumericalError as e:
            # One member's loss became non-finite: the stack stops for all. Alone, each member goes on from its
            # last finished level and only the one that diverges fails, as it would unstacked.
            log_line(options, f"stack: {_one_line(e)}; the {len(group)} IMP searches finish unstacked")
            alone += group
        except Exception as e:  # noqa: BLE001
            # Any other failure of the stack (a member's damaged file, say) is not known to be every member's:
            # alone, each member goes on from its last finished level and only the faulty one fails.
            log_line(options, f"stack: {type(e).__name__}: {_one_line(e)}; the {len(group)} IMP searches finish "
                              "unstacked")
            alone += group
    def finished(i: int) -> bool:  # every level done: run_imp only reads the folder and writes the summary
        return why is None and _finished_levels(folders[i], jobs[i].imp.levels, options) == jobs[i].imp.levels + 1

    take = [i for i in alone if fallback or finished(i)]
    return finish_members(out, take, lambda i: run_imp(jobs[i], options), raise_errors)


class _LevelMetricsCSV(StackedMetricsCSV):
    """Each member's metrics.csv: its earlier rows, then this stage's rows tagged as an unstacked IMP run
    tags them (``stage`` and ``level``)."""

    def __init__(self, paths: list[Path], tensorboard: bool, prefix_rows: list[list[dict[str, Any]]],
                 tags: dict[str, Any]):
        super().__init__(paths, tensorboard, prefix_rows)
        self.tags = tags

    def _write(self, trainer) -> None:
        for path, prefix, hist in zip(self.paths, self.prefix_rows, trainer.member_histories):
            rows = prefix + [{**self.tags, **r} for r in hist]
            write_metrics_csv(path, rows)
            if self.tensorboard:
                from lottery.tracking import write_tensorboard

                write_tensorboard(path.parent, rows)


def _run_stack(jobs: list[IMPJob], options: RunOptions, start: int) -> list[dict[str, Any]]:
    """The levels ``start``.. of ``jobs`` as one stack (their folders locked); every member's summary."""
    plans = [_imp_plan(j) for j in jobs]
    opened = [_open_levels(j, p, options, None) for j, p in zip(jobs, plans)]
    folders = [o[0] for o in opened]
    ctxs = [o[1] for o in opened]
    commons = [o[2] for o in opened]
    first, ctx0, plan = jobs[0], ctxs[0], plans[0]
    for ctx in ctxs[1:]:
        ctx._bundle = ctx0.bundle  # one copy of the data for all members
    train_loader, evals = ctx0.train_loader(ctx0.training), ctx0.evals
    k = ctx0.step(plan.rewind)
    ctx0.check_before_end(k, "IMPHparams.rewind (--rewind, the rewind point)")
    stack([ctx.build() for ctx in ctxs])  # refuses (StackingError) before anything is trained
    K = len(jobs)
    log_line(options, f"stack: {K} IMP searches as one network; they share the data order "
                      f"(seed {data_order_of(first.training, first.seed)})")
    if start:
        log_line(options, f"stack: {K} IMP searches resume as a stack after level {start - 1}")
    stack_wall = 0.0
    levels: list[list[dict[str, Any]]] = [[] for _ in jobs]
    # Finished levels: read back by the unstacked code (their rows go into each member's metrics.csv).
    for i, (job, p, ctx, common) in enumerate(zip(jobs, plans, ctxs, commons)):
        for level in range(start):
            levels[i].append(_level_zero(job, p, ctx, common) if level == 0 else
                             _level(job, p, ctx, common, level, levels[i][0]))

    def train(stage: str, level: int, states: list[dict[str, torch.Tensor]], masks: list[Mask] | None,
              start_iteration: int, desc: str, extra: list) -> list[dict[str, Any]]:
        """One stacked training stage; writes each member's model.safetensors and history.json as
        train_stage does and returns each member's record."""
        nonlocal stack_wall
        models = []
        for ctx, state in zip(ctxs, states):
            model = ctx.build()
            model.load_state_dict(state)
            models.append(model)
        stacked: StackedModel = stack(models)
        callbacks = list(extra)
        if masks is not None:
            masking.attach_hard_mask(stacked.body, Mask({n: _stack_tensors([m[n] for m in masks], stacked.layout[n])
                                                         for n in masks[0]}))
            callbacks.insert(0, EnforceMaskCallback())
        tags = {"stage": stage, "level": level}
        ldirs = [ctx.folder / f"level_{level}" for ctx in ctxs]
        for d in ldirs:
            d.mkdir(parents=True, exist_ok=True)
        callbacks.append(_LevelMetricsCSV([f / "metrics.csv" for f in folders], options.tensorboard,
                                          [list(ctx.rows) for ctx in ctxs], tags))
        # As train_stage does (for member 0: the stacked path refuses Dropout, the one user of these numbers).
        torch.manual_seed(derived_seed(first.seed, f"stage:{stage}"))
        trainer = StackedTrainer(
            stacked.to(options.device), train_loader, ctx0.training, eval_loaders=evals, callbacks=callbacks,
            device=options.device, start=start_iteration, progress=options.progress, desc=desc, log=options.log,
        )
        trainer.fit()
        stack_wall += trainer.wall_seconds
        if masks is not None:
            masking.remove_masks(stacked.body)
        records = []
        for i, (ctx, ldir) in enumerate(zip(ctxs, ldirs)):
            state = unstack_state(stacked, i)
            if masks is not None and any(bool(state[n][~masks[i][n].to(state[n].device)].any()) for n in masks[i]):
                raise AssertionError(f"a stacked member's pruned weights moved while training {stage}")  # invariant
            rows = [{**tags, **row} for row in trainer.member_histories[i]]
            record = {"rows": rows, "wall_seconds": trainer.wall_seconds / K,
                      "epochs": (trainer.iteration - start_iteration) / trainer.iterations_per_epoch,
                      "last": rows[-1] if rows else {}}
            write_json(ldir / "history.json", {**record, "stack": {"size": K, "wall_seconds": trainer.wall_seconds}})
            save_tensors(ldir / "model.safetensors", {n: v.cpu() for n, v in state.items()})
            ctx.rows += rows
            records.append(record)
        return records

    if start == 0:
        rewinds = [f / "rewind.safetensors" for f in folders]
        records = train("level_0", 0, [ctx.build().state_dict() for ctx in ctxs], None, 0,
                        f"{plan.method} level 0 (dense)", [_StackedSnapshot(k.iteration, rewinds)])
        for i, (p, ctx, common, record) in enumerate(zip(plans, ctxs, commons, records)):
            if not rewinds[i].exists():
                raise CheckpointError(f"{rewinds[i]} is missing although level 0 went past the rewind point")
            levels[i].append(_finish_level_zero(p, ctx, common, record, ctx.end.epochs, record["wall_seconds"], {}))
    rewind_states = [load_tensors(f / "rewind.safetensors") for f in folders]
    T = ctx0.end
    for level in range(max(start, 1), first.imp.levels + 1):
        masks, heads = [], []
        for p, ctx, common in zip(plans, ctxs, commons):
            _, mask = _prune_level(p, ctx, level)  # each member's own weights, as an unstacked run prunes them
            masks.append(mask)
            heads.append(_level_head(ctx, common, level, mask))
        records = train(f"level_{level}", level, [_masked_state(r, m) for r, m in zip(rewind_states, masks)], masks,
                        k.iteration, f"{plan.method} level {level}/{first.imp.levels}", [])
        for i, (p, ctx, head, record) in enumerate(zip(plans, ctxs, heads, records)):
            levels[i].append(_finish_level(p, ctx, head, record, _ticket_epochs(p, T, k, level),
                                           record["wall_seconds"], levels[i][0]))
    out = []
    for i, (job, p, folder, ctx, common) in enumerate(zip(jobs, plans, folders, ctxs, commons)):
        summary = _summary(p, folder, common, levels[i], ctx)
        # the members shared the data order: say which (it is also the hparams' data_order_seed, or the seed)
        summary["stack"] = {"size": K, "wall_seconds": stack_wall, "data_order": data_order_of(job.training, job.seed)}
        write_results(folder / "results.json", summary)
        _finish_report(options, p, folder, levels[i])
        out.append(summary)
    return out


__all__ = ["imp_stack_key", "imp_stack_refusal", "run_imp_stacked"]
