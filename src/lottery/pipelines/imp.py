"""IMP, IMP-C, LRR and fine-tuning, as resumable jobs over run folders (the same conventions as
:mod:`lottery.pipelines.cs`). One-shot magnitude pruning, the random controls and the stability
analysis are in :mod:`lottery.pipelines.oneshot`, :mod:`~lottery.pipelines.controls` and
:mod:`~lottery.pipelines.stability` (re-exported here).

Iterative runs (IMP, IMP-C, LRR, fine-tuning) share one folder layout; every file marks a finished
stage, so a killed run restarts at the first missing one::

    search-imp_<model>_<dataset>_s<seed>_<hash>/        (search-imp-c, prune-lrr, prune-finetune)
      hparams.json
      rewind.safetensors          full state (BN statistics too) at the rewind point k  [IMP, IMP-C]
      level_0/                    the dense network
        mask.safetensors, mask.json       all ones over the prunable weights
        model.safetensors, history.json   trained weights (plain state dict, pruned weights exactly 0)
        results.json                      this level's result; its existence marks the level done
      level_L/                    mask_L = prune(weights of level L-1, mask_{L-1}), then training
        mask.safetensors, mask.json, model.safetensors, history.json, results.json
        checkpoint.safetensors            while training (the stage resumes from it)
        continued.safetensors, continued_history.json   IMP-C only: the continued run
      metrics.csv                 every evaluation of every stage (columns stage, level)
      results.json                summary of the levels asked for; accuracy_vs_density.png

``levels`` is not part of a run's identity (it is left out of the folder hash and of hparams.json):
asking for more levels later continues the same folder.

What each level trains, and its ``epochs`` (every epoch spent to obtain this level's network, from the
first dense epoch on; T = training length, k = rewind point, F = fine-tuning length):

* IMP (``variant='rewind'``; k = 0 is the original LTH procedure, k > 0 IMP-R): rewind state x mask_L,
  trained from k to T with a fresh optimizer, the schedule continuing from k. epochs = T + L (T - k).
* IMP-C (``variant='continue'``): the level's *continued run* starts from the weights the mask was
  pruned from (level 0's dense weights, then the previous continued run's) x mask_L and trains a whole
  T-length run with the LR schedule restarted and a fresh optimizer; the next level prunes its end
  weights. Each mask is ALSO retrained as a ticket from the rewind state (k to T): that ticket's accuracy
  is the level's ``test_accuracy``, the continued run's is ``continued_test_accuracy``.
  epochs (ticket) = T + (L - 1) T + (T - k) = L T + (T - k): the dense run, the continued runs of levels
  1..L-1 (which produced mask_L), and the ticket's retraining. ``continued_epochs`` = (L + 1) T.
* LRR: the previous level's trained weights x mask_L, trained from k to T (the LR schedule replayed from
  k). epochs = T + L (T - k).
* fine-tuning: the previous level's trained weights x mask_L, trained for F at the recipe's final LR
  (constant). epochs = T + L F.

LRR, fine-tuning and one-shot magnitude pruning take their dense network from
:func:`lottery.experiment.train_dense`, shared with every other job of the same recipe; IMP trains its
own level 0 because it needs the rewind state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


from lottery.errors import CheckpointError
from lottery.experiment import (
    DenseJob, RunOptions, describe_run, finished_results, folder_lock, log_line, prepare_run_folder, run_folder_name,
    train_dense, write_metrics_csv, write_results,
)
from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
from lottery.io import load_tensors, read_json, save_tensors, write_json
from lottery.masks import Mask
from lottery.methods.cs import SnapshotCallback
from lottery.methods.imp import FinetuneHparams, IMPHparams, LRRHparams, magnitude_prune
from lottery.pipelines.controls import run_random_prune, run_random_reinit  # noqa: F401  (re-exported)
from lottery.pipelines.oneshot import OneShotJob, run_one_shot  # noqa: F401  (re-exported)
from lottery.pipelines.stability import (  # noqa: F401  (re-exported)
    STABILITY_COLUMNS, StabilityJob, plot_stability, run_stability,
)
from lottery.pipelines.stages import (  # noqa: F401  (final_lr_recipe, StageCallbacks: re-exported)
    StageCallbacks, _Context, _accuracies, _identity, _identity_dict, _mask_counts, _masked_state, _pct,
    final_lr_recipe,
)
from lottery.step import Step


#: Columns of the per-level summary table.
LEVEL_COLUMNS = (
    ("method", "method", "{}"),
    ("level", "level", "{}"),
    ("density", "density", "{:.4f}"),
    ("test_accuracy", "test acc %", "pct"),
    ("continued_test_accuracy", "continued acc %", "pct"),
    ("val_accuracy", "val acc %", "pct"),
    ("epochs", "epochs", "{:.1f}"),
    ("wall_seconds", "wall s", "{:.1f}"),
)

MATCHING_TOLERANCE = 0.002

# -- jobs ------------------------------------------------------------------------------------------
@dataclass
class IMPJob:
    data: DataHparams = field(default_factory=DataHparams)
    model: ModelHparams = field(default_factory=ModelHparams)
    training: TrainingHparams = field(default_factory=TrainingHparams)
    imp: IMPHparams = field(default_factory=IMPHparams)
    seed: int = 0

    @property
    def kind(self) -> str:
        return "search-imp" if self.imp.variant == "rewind" else "search-imp-c"

    @property
    def method(self) -> str:
        return "imp" if self.imp.variant == "rewind" else "imp-c"


@dataclass
class LRRJob:
    data: DataHparams = field(default_factory=DataHparams)
    model: ModelHparams = field(default_factory=ModelHparams)
    training: TrainingHparams = field(default_factory=TrainingHparams)
    lrr: LRRHparams = field(default_factory=LRRHparams)
    seed: int = 0

    kind = "prune-lrr"
    method = "lrr"


@dataclass
class FinetuneJob:
    data: DataHparams = field(default_factory=DataHparams)
    model: ModelHparams = field(default_factory=ModelHparams)
    training: TrainingHparams = field(default_factory=TrainingHparams)
    finetune: FinetuneHparams = field(default_factory=FinetuneHparams)
    seed: int = 0

    kind = "prune-finetune"
    method = "finetune"


# -- the iterative methods ---------------------------------------------------------------------------------
@dataclass
class _Plan:
    """What differs between IMP, IMP-C, LRR and fine-tuning."""

    kind: str
    method: str
    hp: Any  # IMPHparams | LRRHparams | FinetuneHparams
    rewind: str | None  # k: the rewind state (IMP) or the LR replay point (LRR)
    needs_rewind_state: bool
    continued: bool  # IMP-C


def run_imp(job: IMPJob, options: RunOptions, *, callbacks: StageCallbacks | None = None) -> dict[str, Any]:
    """IMP (``variant='rewind'``) or IMP-C (``'continue'``): run, resume or reuse; return the summary."""
    return _run_levels(job, _imp_plan(job), options, callbacks)


def run_lrr(job: LRRJob, options: RunOptions, *, callbacks: StageCallbacks | None = None) -> dict[str, Any]:
    """Iterative pruning with learning-rate rewinding."""
    return _run_levels(job, _Plan(job.kind, job.method, job.lrr, job.lrr.rewind, False, False), options, callbacks)


def run_finetune(job: FinetuneJob, options: RunOptions, *, callbacks: StageCallbacks | None = None) -> dict[str, Any]:
    """Iterative pruning with fine-tuning at the final learning rate."""
    return _run_levels(job, _Plan(job.kind, job.method, job.finetune, None, False, False), options, callbacks)


def _imp_plan(job: IMPJob) -> _Plan:
    return _Plan(job.kind, job.method, job.imp, job.imp.rewind, True, job.imp.variant == "continue")


def _levels_folder(job, plan: _Plan, options: RunOptions) -> tuple[Path, dict[str, Any]]:
    """The run folder of an iterative job and its description (hparams.json), ``levels`` left out."""
    hp = plan.hp
    folder = options.out / run_folder_name(plan.kind, job.data, job.model, job.training, _identity(hp), seed=job.seed)
    desc = describe_run(plan.kind, job.seed, data=job.data, model=job.model, training=job.training)
    desc[hp._prefix] = _identity_dict(hp)  # "imp" (both variants), "lrr", "finetune"
    return folder, desc


def _open_levels(job, plan: _Plan, options: RunOptions,
                 callbacks: StageCallbacks | None) -> tuple[Path, _Context, dict[str, Any]]:
    """Prepare an iterative job's run folder; its context and the keys every level's results share.
    (Shared with the stacked IMP path, lottery.pipelines.imp_stacked, which writes the same folders.)"""
    hp = plan.hp
    folder, desc = _levels_folder(job, plan, options)
    prepare_run_folder(folder, desc)
    ctx = _Context(folder, plan.kind, job.data, job.model, job.training, job.seed, options, callbacks)
    common = {"kind": plan.kind, "method": plan.method, "model": job.model.model, "dataset": job.data.dataset,
              "seed": job.seed, "rate": hp.rate, "scope": hp.scope, "run_dir": str(folder)}
    if plan.rewind is not None:
        common["rewind"] = plan.rewind
    return folder, ctx, common


def _run_levels(job, plan: _Plan, options: RunOptions, callbacks: StageCallbacks | None) -> dict[str, Any]:
    hp = plan.hp
    folder, ctx, common = _open_levels(job, plan, options, callbacks)

    with folder_lock(folder):
        levels = [_level_zero(job, plan, ctx, common)]
        for level in range(1, hp.levels + 1):
            levels.append(_level(job, plan, ctx, common, level, levels[0]))
        summary = _summary(plan, folder, common, levels, ctx)
        write_results(folder / "results.json", summary)
    _finish_report(options, plan, folder, levels)
    return summary


def _level_zero(job, plan: _Plan, ctx: _Context, common: dict[str, Any]) -> dict[str, Any]:
    ldir = ctx.folder / "level_0"
    results_path = ldir / "results.json"
    done = finished_results(results_path, ctx.options)
    if done is not None:
        ctx.load_stage(ldir, "model")
        return done
    ldir.mkdir(parents=True, exist_ok=True)
    rewind_path = ctx.folder / "rewind.safetensors"
    extra: dict[str, Any] = {}
    if plan.needs_rewind_state:
        k = ctx.step(plan.rewind)
        ctx.check_before_end(k, f"{type(plan.hp).__name__}.rewind (--rewind, the rewind point)")
        record = ctx.train_stage(
            stage="level_0", directory=ldir, stem="model", start_state=ctx.build().state_dict(), mask=None,
            recipe=ctx.training, desc=f"{plan.method} level 0 (dense)",
            extra_callbacks=[SnapshotCallback(k.iteration, lambda sd: save_tensors(rewind_path, sd))],
            tags={"level": 0},
        )
        if not rewind_path.exists():
            raise CheckpointError(f"{rewind_path} is missing although level 0 went past the rewind point; "
                                  f"delete {ldir} to train level 0 again")
        return _finish_level_zero(plan, ctx, common, record, ctx.end.epochs, record["wall_seconds"], extra)
    else:
        if plan.rewind is not None:
            ctx.check_before_end(ctx.step(plan.rewind), f"{type(plan.hp).__name__}.rewind (--rewind, the LR rewind point)")
        dense = train_dense(DenseJob(job.data, job.model, job.training, seed=job.seed), ctx.options)
        state = load_tensors(Path(dense["run_dir"]) / "model.safetensors")
        record = {"rows": [], "wall_seconds": 0.0, "epochs": dense["epochs"],
                  "last": {"test_accuracy": dense["test_accuracy"], "val_accuracy": dense["val_accuracy"],
                           "test_loss": dense.get("test_loss")}, "dense_run_dir": dense["run_dir"]}
        write_json(ldir / "history.json", record)
        save_tensors(ldir / "model.safetensors", state)
        extra["dense_run_dir"] = dense["run_dir"]
        return _finish_level_zero(plan, ctx, common, record, dense["epochs"], dense.get("wall_seconds") or 0.0, extra)


def _finish_level_zero(plan: _Plan, ctx: _Context, common: dict[str, Any], record: dict[str, Any], epochs: float,
                       wall: float, extra: dict[str, Any]) -> dict[str, Any]:
    """Level 0's mask (all ones) and results.json, once its network is trained (``record``: its history)."""
    ldir = ctx.folder / "level_0"
    results_path = ldir / "results.json"
    accs = _accuracies(record)
    mask = Mask.load_or_create(ldir / "mask.safetensors", lambda: Mask.ones(ctx.build(), ctx.prunable_names()))
    result = {**common, "level": 0, **_mask_counts(mask), **ctx.cost(mask, ldir / "mask.json"), **accs,
              "epochs": epochs, "wall_seconds": wall, "level_dir": str(ldir), **extra}
    if plan.continued:
        result.update(_accuracies(record, "continued_"))
        result["continued_epochs"] = epochs
    write_results(results_path, result)
    _level_line(ctx.options, plan, result, result, plan.hp.levels)
    return result


def _level(job, plan: _Plan, ctx: _Context, common: dict[str, Any], level: int, dense: dict[str, Any]) -> dict[str, Any]:
    hp = plan.hp
    ldir = ctx.folder / f"level_{level}"
    results_path = ldir / "results.json"
    done = finished_results(results_path, ctx.options)
    if done is not None:
        if plan.continued:
            ctx.load_stage(ldir, "continued")
        ctx.load_stage(ldir, "model")
        return done
    source_state, mask = _prune_level(plan, ctx, level)
    T = ctx.end
    tags = {"level": level}
    wall = 0.0
    result = _level_head(ctx, common, level, mask)
    if plan.continued:
        cont = ctx.train_stage(
            stage=f"level_{level}_continued", directory=ldir, stem="continued",
            start_state=_masked_state(source_state, mask), mask=mask, recipe=ctx.training, start=0,
            desc=f"imp-c level {level}/{hp.levels} continued", tags=tags,
        )
        wall += cont["wall_seconds"]
        result.update(_accuracies(cont, "continued_"))
        result["continued_epochs"] = (level + 1) * T.epochs
    if plan.needs_rewind_state:  # IMP and IMP-C tickets: rewind state x mask, from k
        k = ctx.step(plan.rewind)
        rewind = load_tensors(ctx.folder / "rewind.safetensors")
        record = ctx.train_stage(
            stage=f"level_{level}", directory=ldir, stem="model", start_state=_masked_state(rewind, mask),
            mask=mask, recipe=ctx.training, start=k.iteration, desc=f"{plan.method} level {level}/{hp.levels}",
            tags=tags,
        )
        epochs = _ticket_epochs(plan, T, k, level)
    elif plan.method == "lrr":
        k = ctx.step(plan.rewind)
        record = ctx.train_stage(
            stage=f"level_{level}", directory=ldir, stem="model", start_state=_masked_state(source_state, mask),
            mask=mask, recipe=ctx.training, start=k.iteration, desc=f"lrr level {level}/{hp.levels}", tags=tags,
        )
        epochs = T.epochs + level * (T.iteration - k.iteration) / T.iterations_per_epoch
    else:  # fine-tuning at the final learning rate
        steps = hp.finetune_steps or ctx.training.training_steps
        recipe = final_lr_recipe(ctx.training, steps, ctx.ipe)
        record = ctx.train_stage(
            stage=f"level_{level}", directory=ldir, stem="model", start_state=_masked_state(source_state, mask),
            mask=mask, recipe=recipe, start=0, desc=f"fine-tune level {level}/{hp.levels}", tags=tags,
        )
        epochs = T.epochs + level * ctx.step(steps).epochs
    return _finish_level(plan, ctx, result, record, epochs, wall + record["wall_seconds"], dense)


def _prune_level(plan: _Plan, ctx: _Context, level: int) -> tuple[dict[str, Any], Mask]:
    """Level ``level``'s mask (pruned from the previous level's weights, or read back when this level was
    started before) and the weights it was pruned from. Shared with the stacked IMP path so that a stacked
    member prunes exactly as an unstacked run: the same call on its own weights."""
    hp = plan.hp
    ldir = ctx.folder / f"level_{level}"
    prev = ctx.folder / f"level_{level - 1}"
    ldir.mkdir(parents=True, exist_ok=True)
    # The weights this level prunes from: the previous level's trained network, or for IMP-C the
    # previous continued run (level 0's dense network at level 1).
    source = prev / ("continued.safetensors" if plan.continued and level > 1 else "model.safetensors")
    prev_mask = Mask.load(prev / "mask.safetensors")
    source_state = load_tensors(source)
    mask = Mask.load_or_create(ldir / "mask.safetensors",
                           lambda: magnitude_prune(source_state, prev_mask, hp.rate, hp.scope))
    if not _is_subset(mask, prev_mask):
        raise CheckpointError(f"{ldir / 'mask.safetensors'} keeps weights that level {level - 1} pruned; "
                              f"delete {ldir} to prune this level again")
    return source_state, mask


def _level_head(ctx: _Context, common: dict[str, Any], level: int, mask: Mask) -> dict[str, Any]:
    """The keys of a level's results known before it trains (its mask's counts and cost; mask.json)."""
    ldir = ctx.folder / f"level_{level}"
    return {**common, "level": level, **_mask_counts(mask), **ctx.cost(mask, ldir / "mask.json"),
            "level_dir": str(ldir)}


def _ticket_epochs(plan: _Plan, T: Step, k: Step, level: int) -> float:
    """Every epoch spent to obtain an IMP (IMP-C) level's ticket (see the module docstring)."""
    retrain = (T.iteration - k.iteration) / T.iterations_per_epoch
    return (level * T.epochs + retrain) if plan.continued else (T.epochs + level * retrain)


def _finish_level(plan: _Plan, ctx: _Context, result: dict[str, Any], record: dict[str, Any], epochs: float,
                  wall: float, dense: dict[str, Any]) -> dict[str, Any]:
    """A trained level's results.json (``record``: the history of its network's training)."""
    result.update(_accuracies(record))
    result["epochs"] = epochs
    result["wall_seconds"] = wall
    write_results(Path(result["level_dir"]) / "results.json", result)
    _level_line(ctx.options, plan, result, dense, plan.hp.levels)
    return result


def _is_subset(a: Mask, b: Mask) -> bool:
    return set(a) == set(b) and all(not bool((a[n] & ~b[n]).any()) for n in a)


def _level_line(options: RunOptions, plan: _Plan, r: dict[str, Any], dense: dict[str, Any], levels: int) -> None:
    parts = [f"{plan.method} level {r['level']}/{levels}:",
             f"density {r['density']:.4f} ({r['kept_weights']}/{r['prunable_weights']})",
             f"test {_pct(r.get('test_accuracy'))}"]
    if plan.continued:
        parts.append(f"continued {_pct(r.get('continued_test_accuracy'))}")
    parts += [f"(dense {_pct(dense.get('test_accuracy'))})", f"{r['epochs']:.1f} epochs"]
    log_line(options, "  ".join(parts))


def sparsest_matching(levels: Sequence[dict[str, Any]], dense_accuracy: float | None,
                      tolerance: float = MATCHING_TOLERANCE) -> dict[str, Any] | None:
    """The sparsest level whose test accuracy is within ``tolerance`` of the dense network's (one seed).
    Level 0, or any level that pruned nothing (density 1), is the dense network, not a ticket: never chosen."""
    if dense_accuracy is None:
        return None
    ok = [r for r in levels if r.get("test_accuracy") is not None and r.get("density") is not None
          and r["density"] < 1.0 and r["test_accuracy"] >= dense_accuracy - tolerance]
    if not ok:
        return None
    best = min(ok, key=lambda r: r["density"])
    return {"level": best["level"], "density": best["density"], "test_accuracy": best["test_accuracy"]}


def _summary(plan: _Plan, folder: Path, common: dict[str, Any], levels: list[dict[str, Any]], ctx: _Context) -> dict[str, Any]:
    dense_acc = levels[0].get("test_accuracy")
    epochs_total = levels[-1]["epochs"]
    if plan.continued and len(levels) > 1:
        # every continued run (levels 1..L) plus every ticket retraining
        last = levels[-1]
        retrain = last["epochs"] - (last["level"]) * levels[0]["epochs"]
        epochs_total = last["continued_epochs"] + (len(levels) - 1) * retrain
    if ctx.rows:
        write_metrics_csv(folder / "metrics.csv", ctx.rows)
    return {
        **{k: v for k, v in common.items() if k not in ("rate", "scope")},
        "rate": plan.hp.rate,
        "scope": plan.hp.scope,
        "levels": levels,
        "dense_test_accuracy": dense_acc,
        "sparsest_matching": sparsest_matching(levels, dense_acc),
        "epochs_total": epochs_total,
        "wall_seconds": sum(r.get("wall_seconds") or 0.0 for r in levels),
    }


def _finish_report(options: RunOptions, plan: _Plan, folder: Path, levels: list[dict[str, Any]]) -> None:
    from lottery.report import format_table, plot_accuracy_vs_density

    log_line(options, f"\n{plan.method}: {folder}\n" + format_table(levels, LEVEL_COLUMNS))
    points = [r for r in levels if r.get("test_accuracy") is not None]
    if plan.continued:
        points += [{**r, "method": "imp-c continued", "test_accuracy": r["continued_test_accuracy"]}
                   for r in levels if r.get("continued_test_accuracy") is not None]
    if points:
        plot_accuracy_vs_density(points, folder / "accuracy_vs_density.png",
                                 dense_accuracy=levels[0].get("test_accuracy"),
                                 title=f"{plan.method}: {levels[0]['model']} on {levels[0]['dataset']}")
