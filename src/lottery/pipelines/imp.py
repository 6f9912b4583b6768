"""IMP, IMP-C, LRR, fine-tuning, one-shot magnitude pruning, the random controls and the stability
analysis, as resumable jobs over run folders (the same conventions as :mod:`lottery.pipelines.cs`).

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
from typing import Any, Callable, Sequence

import torch
from torch import nn

from lottery import masking
from lottery.cost import add_cost
from lottery.engine import Callback, Trainer, evaluate
from lottery.engine.schedule import LRSchedule
from lottery.errors import CheckpointError, ConfigError
from lottery.experiment import (
    DenseJob, MetricsCSV, RunOptions, build_model, describe_run, folder_lock, load_data, log_line,
    make_loaders, prepare_run_folder, prune_ignore, reuse_finished, run_folder_name, train_dense,
    write_metrics_csv,
)
from lottery.hparams import DataHparams, Hparams, ModelHparams, TrainingHparams
from lottery.io import load_tensors, read_json, remove_if_exists, save_tensors, write_json
from lottery.masks import Mask
from lottery.methods.cs import EnforceMaskCallback, SnapshotCallback
from lottery.methods.imp import (
    FinetuneHparams, IMPHparams, LRRHparams, OneShotHparams, RandomPruneHparams, RandomReinitHparams,
    derived_seed, magnitude_prune, one_shot_magnitude, random_prune, random_reinit,
)
from lottery.methods.stability import StabilityHparams, instability, l2_distance
from lottery.step import Step

#: ``callbacks(stage)`` returns extra callbacks for one training stage (``'level_2'``,
#: ``'level_2_continued'``, ``'control'``, ``'dense'``, ``'k_1ep_copy_0'``): progress hooks, loggers, tests.
StageCallbacks = Callable[[str], Sequence[Callback]]

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

STABILITY_COLUMNS = (
    ("rewind", "k", "{}"),
    ("rewind_iteration", "k (it)", "{}"),
    ("density", "density", "{:.4f}"),
    ("instability", "instability %", "pct"),
    ("error_a", "error a %", "pct"),
    ("error_b", "error b %", "pct"),
    ("max_error", "max error %", "pct"),
    ("l2_to_dense", "L2 to dense", "{:.4f}"),
    ("l2_between", "L2 a-b", "{:.4f}"),
)

# Matching ticket (IMP-R's definition): within 0.2 percentage points of the dense network.
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


@dataclass
class OneShotJob:
    data: DataHparams = field(default_factory=DataHparams)
    model: ModelHparams = field(default_factory=ModelHparams)
    training: TrainingHparams = field(default_factory=TrainingHparams)
    oneshot: OneShotHparams = field(default_factory=OneShotHparams)
    seed: int = 0

    kind = "prune-magnitude"
    method = "magnitude"


@dataclass
class StabilityJob:
    data: DataHparams = field(default_factory=DataHparams)
    model: ModelHparams = field(default_factory=ModelHparams)
    training: TrainingHparams = field(default_factory=TrainingHparams)
    stability: StabilityHparams = field(default_factory=StabilityHparams)
    seed: int = 0

    kind = "stability"


# -- shared machinery ----------------------------------------------------------------------------------
def _history_name(stem: str) -> str:
    return "history.json" if stem == "model" else f"{stem}_history.json"


def _checkpoint_name(stem: str) -> str:
    return "checkpoint.safetensors" if stem == "model" else f"{stem}_checkpoint.safetensors"


def _identity(hp: Hparams) -> Hparams:
    """The hparams that name a run: ``levels`` reset to its default, so more levels continue a folder."""
    if hasattr(hp, "levels"):
        return hp.replace(levels=type(hp)().levels)  # type: ignore[attr-defined]
    return hp


def _identity_dict(hp: Hparams) -> dict[str, Any]:
    return {k: v for k, v in hp.to_dict().items() if k != "levels"}


def final_lr_recipe(training: TrainingHparams, steps: str, ipe: int) -> TrainingHparams:
    """``steps`` of training at the constant final learning rate of ``training`` (fine-tuning)."""
    end = Step.parse(training.training_steps, ipe).iteration
    final_lr = training.lr * LRSchedule(training, ipe)(max(0, end - 1))
    return training.replace(training_steps=steps, lr=final_lr, schedule="constant", milestones=(),
                            warmup_steps="0it")


class _Context:
    """One run folder's job: lazily loaded data, fresh models, and training stages that skip when done."""

    def __init__(self, folder: Path, kind: str, data: DataHparams, model: ModelHparams,
                 training: TrainingHparams, seed: int, options: RunOptions,
                 callbacks: StageCallbacks | None = None):
        self.folder = folder
        self.kind = kind
        self.data_hp, self.model_hp, self.training = data, model, training
        self.seed = seed
        self.options = options
        self.callbacks = callbacks
        self.rows: list[dict[str, Any]] = []
        self._bundle = None
        self._train_loaders: dict[Any, Any] = {}
        self._evals = None

    # data and models --------------------------------------------------------------------------------
    @property
    def bundle(self):
        if self._bundle is None:
            self._bundle = load_data(self.data_hp, self.options)
        return self._bundle

    def train_loader(self, recipe: TrainingHparams):
        key = (recipe.batch_size, recipe.data_order_seed)
        if key not in self._train_loaders:
            train, evals = make_loaders(self.bundle, recipe, self.seed, self.options)
            self._train_loaders[key] = train
            if self._evals is None:
                self._evals = evals
        return self._train_loaders[key]

    @property
    def evals(self):
        if self._evals is None:
            self.train_loader(self.training)
        return self._evals

    @property
    def ipe(self) -> int:
        return len(self.train_loader(self.training))

    def step(self, spec: str | int) -> Step:
        return Step.parse(spec, self.ipe)

    @property
    def end(self) -> Step:
        return self.step(self.training.training_steps)

    def build(self) -> nn.Module:
        return build_model(self.model_hp, self.bundle, self.seed)

    def cost(self, mask: Mask | None, mask_report: Path | None = None, requested: float | None = None,
             model: nn.Module | None = None) -> dict[str, Any]:
        """Parameters and FLOPs of this network under ``mask`` (lottery.cost); adds per-layer FLOPs to
        ``mask_report`` (a mask.json)."""
        return add_cost({"density": mask.density() if mask is not None else 1.0}, model or self.build(), mask,
                        self.bundle.input_shape, mask_report, requested)

    def prunable_names(self) -> list[str]:
        return list(masking.prunable_weights(self.build(), ignore=prune_ignore(self.model_hp)))

    def check_before_end(self, k: Step, what: str) -> None:
        if k >= self.end:
            raise ConfigError(f"{what} {k} is not before the end of training ({self.training.training_steps}); "
                              "choose an earlier step")

    # stages -------------------------------------------------------------------------------------------
    def load_stage(self, directory: Path, stem: str) -> dict[str, Any] | None:
        """A finished stage's record (rows, wall seconds, last row), or None when it has not finished."""
        out, hist = directory / f"{stem}.safetensors", directory / _history_name(stem)
        if not (out.exists() and hist.exists()):
            return None
        remove_if_exists(directory / _checkpoint_name(stem))  # left behind when killed right after the stage's files
        record = read_json(hist)
        self.rows += record["rows"]
        return record

    def train_stage(
        self,
        *,
        stage: str,
        directory: Path,
        stem: str,
        start_state: dict[str, torch.Tensor],
        mask: Mask | None,
        recipe: TrainingHparams,
        start: int = 0,
        desc: str,
        extra_callbacks: Sequence[Callback] = (),
        tags: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Train ``start_state`` x ``mask`` with ``recipe`` from iteration ``start`` to its end (fresh
        optimizer); save the plain final weights as ``<stem>.safetensors``. Returns at once when done."""
        done = self.load_stage(directory, stem)
        if done is not None:
            return done
        directory.mkdir(parents=True, exist_ok=True)
        tags = {"stage": stage, **(tags or {})}
        model = self.build()
        try:
            model.load_state_dict(start_state)
        except RuntimeError as e:
            raise CheckpointError(f"the start state of stage {stage} does not fit the model: {e}") from None
        callbacks: list[Callback] = list(extra_callbacks)
        if mask is not None:
            masking.attach_hard_mask(model, mask)
            callbacks.insert(0, EnforceMaskCallback())
        callbacks.append(MetricsCSV(self.folder / "metrics.csv", prefix_rows=list(self.rows), extra=tags,
                              tensorboard=self.options.tensorboard))
        if self.callbacks is not None:
            callbacks += list(self.callbacks(stage))
        # Each stage draws its random numbers (dropout, ...) from a seed of its own, so a stage run after
        # a resume sees the same ones as in an uninterrupted run (and IMP and IMP-C share level 0).
        torch.manual_seed(derived_seed(self.seed, f"stage:{stage}"))
        trainer = Trainer(
            model, self.train_loader(recipe), recipe, eval_loaders=self.evals, callbacks=callbacks,
            device=self.options.device, checkpoint_path=directory / _checkpoint_name(stem), start=start,
            progress=self.options.progress, desc=desc, log=self.options.log,
        )
        history = trainer.fit()
        if mask is not None:
            if masking.current_mask(model) != mask:
                raise AssertionError(f"the mask changed while training stage {stage}")  # internal invariant
            masking.remove_masks(model)
        rows = [{**tags, **row} for row in history]
        record = {"rows": rows, "wall_seconds": trainer.wall_seconds,
                  "epochs": (trainer.iteration - start) / trainer.iterations_per_epoch,
                  "last": rows[-1] if rows else {}}
        write_json(directory / _history_name(stem), record)
        save_tensors(directory / f"{stem}.safetensors", model.state_dict())
        remove_if_exists(directory / _checkpoint_name(stem))
        self.rows += rows
        return record



def _masked_state(state: dict[str, torch.Tensor], mask: Mask) -> dict[str, torch.Tensor]:
    out = dict(state)
    for n, m in mask.items():
        out[n] = state[n].masked_fill(~m.to(state[n].device), 0)
    return out


def _accuracies(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    last = record.get("last") or {}
    return {f"{prefix}test_accuracy": last.get("test_accuracy"), f"{prefix}val_accuracy": last.get("val_accuracy"),
            f"{prefix}test_loss": last.get("test_loss")}


def _mask_counts(mask: Mask) -> dict[str, Any]:
    return {"density": mask.density(), "kept_weights": mask.num_kept(), "prunable_weights": mask.num_total()}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


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
    plan = _Plan(job.kind, job.method, job.imp, job.imp.rewind, True, job.imp.variant == "continue")
    return _run_levels(job, plan, options, callbacks)


def run_lrr(job: LRRJob, options: RunOptions, *, callbacks: StageCallbacks | None = None) -> dict[str, Any]:
    """Iterative pruning with learning-rate rewinding."""
    return _run_levels(job, _Plan(job.kind, job.method, job.lrr, job.lrr.rewind, False, False), options, callbacks)


def run_finetune(job: FinetuneJob, options: RunOptions, *, callbacks: StageCallbacks | None = None) -> dict[str, Any]:
    """Iterative pruning with fine-tuning at the final learning rate."""
    return _run_levels(job, _Plan(job.kind, job.method, job.finetune, None, False, False), options, callbacks)


def _run_levels(job, plan: _Plan, options: RunOptions, callbacks: StageCallbacks | None) -> dict[str, Any]:
    hp = plan.hp
    ident = _identity(hp)
    folder = options.out / run_folder_name(plan.kind, job.data, job.model, job.training, ident, seed=job.seed)
    desc = describe_run(plan.kind, job.seed, data=job.data, model=job.model, training=job.training)
    desc[hp._prefix] = _identity_dict(hp)  # "imp" (both variants), "lrr", "finetune"
    prepare_run_folder(folder, desc)
    ctx = _Context(folder, plan.kind, job.data, job.model, job.training, job.seed, options, callbacks)
    common = {"kind": plan.kind, "method": plan.method, "model": job.model.model, "dataset": job.data.dataset,
              "seed": job.seed, "rate": hp.rate, "scope": hp.scope, "run_dir": str(folder)}
    if plan.rewind is not None:
        common["rewind"] = plan.rewind

    with folder_lock(folder):
        levels = [_level_zero(job, plan, ctx, common)]
        for level in range(1, hp.levels + 1):
            levels.append(_level(job, plan, ctx, common, level, levels[0]))
        summary = _summary(plan, folder, common, levels, ctx)
        write_json(folder / "results.json", summary)
    _finish_report(options, plan, folder, levels)
    return summary


def _level_zero(job, plan: _Plan, ctx: _Context, common: dict[str, Any]) -> dict[str, Any]:
    ldir = ctx.folder / "level_0"
    results_path = ldir / "results.json"
    if results_path.exists():
        ctx.load_stage(ldir, "model")
        return read_json(results_path)
    ldir.mkdir(parents=True, exist_ok=True)
    rewind_path = ctx.folder / "rewind.safetensors"
    extra: dict[str, Any] = {}
    if plan.needs_rewind_state:
        k = ctx.step(plan.rewind)
        ctx.check_before_end(k, f"{type(plan.hp).__name__}.rewind (the rewind point)")
        record = ctx.train_stage(
            stage="level_0", directory=ldir, stem="model", start_state=ctx.build().state_dict(), mask=None,
            recipe=ctx.training, desc=f"{plan.method} level 0 (dense)",
            extra_callbacks=[SnapshotCallback(k.iteration, lambda sd: save_tensors(rewind_path, sd))],
            tags={"level": 0},
        )
        if not rewind_path.exists():
            raise CheckpointError(f"{rewind_path} is missing although level 0 went past the rewind point; "
                                  f"delete {ldir} to train level 0 again")
        epochs = ctx.end.epochs
        wall = record["wall_seconds"]
        accs = _accuracies(record)
    else:
        if plan.rewind is not None:
            ctx.check_before_end(ctx.step(plan.rewind), f"{type(plan.hp).__name__}.rewind (the LR rewind point)")
        dense = train_dense(DenseJob(job.data, job.model, job.training, seed=job.seed), ctx.options)
        state = load_tensors(Path(dense["run_dir"]) / "model.safetensors")
        record = {"rows": [], "wall_seconds": 0.0, "epochs": dense["epochs"],
                  "last": {"test_accuracy": dense["test_accuracy"], "val_accuracy": dense["val_accuracy"],
                           "test_loss": dense.get("test_loss")}, "dense_run_dir": dense["run_dir"]}
        write_json(ldir / "history.json", record)
        save_tensors(ldir / "model.safetensors", state)
        epochs, wall = dense["epochs"], dense.get("wall_seconds") or 0.0
        accs = _accuracies(record)
        extra["dense_run_dir"] = dense["run_dir"]
    mask = Mask.load_or_create(ldir / "mask.safetensors", lambda: Mask.ones(ctx.build(), ctx.prunable_names()))
    result = {**common, "level": 0, **_mask_counts(mask), **ctx.cost(mask, ldir / "mask.json"), **accs,
              "epochs": epochs, "wall_seconds": wall, "level_dir": str(ldir), **extra}
    if plan.continued:
        result.update(_accuracies(record, "continued_"))
        result["continued_epochs"] = epochs
    write_json(results_path, result)
    _level_line(ctx.options, plan, result, result, plan.hp.levels)
    return result


def _level(job, plan: _Plan, ctx: _Context, common: dict[str, Any], level: int, dense: dict[str, Any]) -> dict[str, Any]:
    hp = plan.hp
    ldir = ctx.folder / f"level_{level}"
    prev = ctx.folder / f"level_{level - 1}"
    results_path = ldir / "results.json"
    if results_path.exists():
        if plan.continued:
            ctx.load_stage(ldir, "continued")
        ctx.load_stage(ldir, "model")
        return read_json(results_path)
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
    T = ctx.end
    tags = {"level": level}
    wall = 0.0
    result: dict[str, Any] = {**common, "level": level, **_mask_counts(mask), **ctx.cost(mask, ldir / "mask.json"),
                              "level_dir": str(ldir)}
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
        retrain = (T.iteration - k.iteration) / T.iterations_per_epoch
        epochs = (level * T.epochs + retrain) if plan.continued else (T.epochs + level * retrain)
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
    wall += record["wall_seconds"]
    result.update(_accuracies(record))
    result["epochs"] = epochs
    result["wall_seconds"] = wall
    write_json(results_path, result)
    _level_line(ctx.options, plan, result, dense, hp.levels)
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
    """The sparsest level whose test accuracy is within ``tolerance`` of the dense network's (one seed)."""
    if dense_accuracy is None:
        return None
    ok = [r for r in levels if r.get("test_accuracy") is not None and r["test_accuracy"] >= dense_accuracy - tolerance]
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


# -- one-shot magnitude pruning ----------------------------------------------------------------------------
def run_one_shot(job: OneShotJob, options: RunOptions, *, callbacks: StageCallbacks | None = None) -> dict[str, Any]:
    """Prune the trained dense network of the recipe (shared with ``lottery train``) to ``density`` by
    magnitude in one step; evaluate; optionally fine-tune at the final learning rate."""
    hp = job.oneshot
    dense = train_dense(DenseJob(job.data, job.model, job.training, seed=job.seed), options)
    folder = options.out / run_folder_name(job.kind, job.data, job.model, job.training, hp, seed=job.seed)
    desc = describe_run(job.kind, job.seed, data=job.data, model=job.model, training=job.training, oneshot=hp)
    results_path = folder / "results.json"
    done = reuse_finished(folder, desc, options)
    if done is not None:
        return done
    with folder_lock(folder):
        ctx = _Context(folder, job.kind, job.data, job.model, job.training, job.seed, options, callbacks)
        state = load_tensors(Path(dense["run_dir"]) / "model.safetensors")
        names = ctx.prunable_names()
        mask = Mask.load_or_create(folder / "mask.safetensors",
                               lambda: one_shot_magnitude(state, hp.density, hp.scope, names=names))
        pruned = _masked_state(state, mask)
        model = ctx.build()
        model.load_state_dict(pruned)
        model.to(options.device)
        before = {split: evaluate(model, loader, options.device) for split, loader in ctx.evals.items()}
        out: dict[str, Any] = {
            "test_accuracy_before_finetune": before["test"]["top1"],
            "test_accuracy": before["test"]["top1"],
            "val_accuracy": before["val"]["top1"] if "val" in before else None,
            "test_loss": before["test"]["loss"],
        }
        ft = ctx.step(hp.finetune_steps)
        wall = 0.0
        if ft.iteration > 0:
            record = ctx.train_stage(stage="finetune", directory=folder, stem="model", start_state=pruned, mask=mask,
                                     recipe=final_lr_recipe(job.training, hp.finetune_steps, ctx.ipe),
                                     desc="fine-tune")
            out.update(_accuracies(record))
            wall = record["wall_seconds"]
        else:
            save_tensors(folder / "model.safetensors", pruned)
        results = {
            "kind": job.kind, "method": job.method, "model": job.model.model, "dataset": job.data.dataset,
            "seed": job.seed, "scope": hp.scope, "target_density": hp.density, **_mask_counts(mask),
            **ctx.cost(mask, folder / "mask.json", hp.density, model), **out,
            "epochs": dense["epochs"] + ft.epochs, "finetune_epochs": ft.epochs,
            "wall_seconds": (dense.get("wall_seconds") or 0.0) + wall,
            "dense_test_accuracy": dense["test_accuracy"], "dense_run_dir": dense["run_dir"], "run_dir": str(folder),
        }
        write_json(results_path, results)
    log_line(options, f"magnitude ({hp.scope}) to density {mask.density():.4f}: test "
                      f"{_pct(results['test_accuracy_before_finetune'])} before fine-tuning, "
                      f"{_pct(results['test_accuracy'])} after (dense {_pct(dense['test_accuracy'])})")
    return results


# -- controls on a saved IMP level ---------------------------------------------------------------------------
def _load_source(source: Path) -> dict[str, Any]:
    source = Path(source)
    hp_file = source / "hparams.json"
    if not hp_file.exists():
        raise ConfigError(f"{source} is not a run folder (no hparams.json)")
    desc = read_json(hp_file)
    if desc.get("kind") not in ("search-imp", "search-imp-c"):
        raise ConfigError(f"{source} is a {desc.get('kind')!r} run; controls need an IMP run "
                          "(lottery search imp / imp-c), whose rewind state they retrain")
    return {
        "kind": desc["kind"], "seed": int(desc["seed"]),
        "data": DataHparams.from_dict(desc["data"]), "model": ModelHparams.from_dict(desc["model"]),
        "training": TrainingHparams.from_dict(desc["training"]),
        "imp": IMPHparams.from_dict(desc["imp"]),
    }


def run_random_prune(source: str | Path, hp: RandomPruneHparams, options: RunOptions, *,
                     callbacks: StageCallbacks | None = None) -> dict[str, Any]:
    """Control: a random mask with the counts of ``source``'s level ``hp.level`` (per layer, or in total),
    trained from the same rewind state as the ticket."""
    return _run_control(Path(source), "random-prune", hp, options, callbacks)


def run_random_reinit(source: str | Path, hp: RandomReinitHparams, options: RunOptions, *,
                      callbacks: StageCallbacks | None = None) -> dict[str, Any]:
    """Control: ``source``'s level ``hp.level`` mask on newly drawn random weights, trained like the ticket
    (from step k to the end, so with the same training budget and LR schedule)."""
    return _run_control(Path(source), "random-reinit", hp, options, callbacks)


def _run_control(source: Path, control: str, hp, options: RunOptions, callbacks) -> dict[str, Any]:
    src = _load_source(source)
    level_dir = source / f"level_{hp.level}"
    if not (level_dir / "mask.safetensors").exists():
        raise ConfigError(f"{source} has no level {hp.level} yet ({level_dir / 'mask.safetensors'} is missing)")
    kind = f"control-{control}"
    data, model_hp, training, imp = src["data"], src["model"], src["training"], src["imp"]
    seed = src["seed"]
    folder = options.out / run_folder_name(kind, data, model_hp, training, imp, hp, seed=seed)
    desc = describe_run(kind, seed, data=data, model=model_hp, training=training, control=hp)
    desc["imp"] = _identity_dict(imp)
    desc["source"] = source.resolve().name
    results_path = folder / "results.json"
    done = reuse_finished(folder, desc, options)
    if done is not None:
        return done
    with folder_lock(folder):
        ctx = _Context(folder, kind, data, model_hp, training, seed, options, callbacks)
        reference = Mask.load(level_dir / "mask.safetensors")
        k = ctx.step(imp.rewind)
        rewind = load_tensors(source / "rewind.safetensors")
        if control == "random-prune":
            mask = Mask.load_or_create(folder / "mask.safetensors",
                                   lambda: random_prune(reference, like=reference, scope=hp.scope, seed=hp.seed))
            start_state = _masked_state(rewind, mask)
        else:
            mask = reference
            mask.save(folder / "mask.safetensors")
            net = random_reinit(ctx.build(), mask, hp.seed)
            start_state = masking.to_plain_state_dict(net.state_dict())
        record = ctx.train_stage(stage="control", directory=folder, stem="model", start_state=start_state, mask=mask,
                                 recipe=training, start=k.iteration, desc=f"{control} (level {hp.level})")
        ticket = read_json(level_dir / "results.json") if (level_dir / "results.json").exists() else {}
        results = {
            "kind": kind, "method": control, "model": model_hp.model, "dataset": data.dataset, "seed": seed,
            "control_seed": hp.seed, "level": hp.level, **({"scope": hp.scope} if control == "random-prune" else {}),
            **_mask_counts(mask), **ctx.cost(mask, folder / "mask.json"), **_accuracies(record), "rewind": imp.rewind,
            "epochs": (ctx.end.iteration - k.iteration) / ctx.ipe, "wall_seconds": record["wall_seconds"],
            "ticket_test_accuracy": ticket.get("test_accuracy"), "source_run": str(source), "run_dir": str(folder),
        }
        write_json(results_path, results)
    log_line(options, f"{control} control of level {hp.level} (density {results['density']:.4f}, seed {hp.seed}): "
                      f"test {_pct(results['test_accuracy'])}, ticket {_pct(results['ticket_test_accuracy'])}")
    return results


# -- stability ----------------------------------------------------------------------------------------------
def _k_dirname(spec: str) -> str:
    return "k_" + "".join(c for c in spec if c.isalnum())


def run_stability(job: StabilityJob, options: RunOptions, *, callbacks: StageCallbacks | None = None) -> dict[str, Any]:
    """Instability and L2 distance against the rewind point k (IMP-R / LMC).

    One dense run of the recipe saves the full state at every k and gives the reference trained network.
    For each k, two copies start from that state (times the mask, if one is given) and train to the end
    with the data-order seeds ``copy_seeds``; the test error along the line between their final weights
    gives the instability, and their prunable weights' L2 distance to the dense trained network (mean of
    the two copies) the distance. Writes ``stability.csv``, ``stability.md`` and ``stability.png``.
    """
    hp = job.stability
    folder = options.out / run_folder_name(job.kind, job.data, job.model, job.training, hp, seed=job.seed)
    desc = describe_run(job.kind, job.seed, data=job.data, model=job.model, training=job.training, stability=hp)
    results_path = folder / "results.json"
    done = reuse_finished(folder, desc, options)
    if done is not None:
        return done
    with folder_lock(folder):
        ctx = _Context(folder, job.kind, job.data, job.model, job.training, job.seed, options, callbacks)
        names = ctx.prunable_names()
        mask = None
        if hp.mask is not None:
            mask = Mask.load(hp.mask)
            mask.validate(ctx.build())
            names = list(mask)
        ks = [(spec, ctx.step(spec)) for spec in hp.rewind_points]
        for spec, k in ks:
            ctx.check_before_end(k, "StabilityHparams.rewind_points: the rewind point")
        ddir = folder / "dense"

        def snapshot(spec: str, k: Step) -> Callback:
            path = ddir / f"rewind_{k.iteration}it.safetensors"
            return SnapshotCallback(k.iteration, lambda sd, p=path: save_tensors(p, sd))

        dense = ctx.train_stage(stage="dense", directory=ddir, stem="model", start_state=ctx.build().state_dict(),
                                mask=None, recipe=job.training, desc="stability dense",
                                extra_callbacks=[snapshot(spec, k) for spec, k in ks])
        dense_state = load_tensors(ddir / "model.safetensors")
        rows = []
        for spec, k in ks:
            kdir = folder / _k_dirname(spec)
            result_path = kdir / "result.json"
            if result_path.exists():
                for i in range(2):
                    ctx.load_stage(kdir, f"copy_{i}")
                rows.append(read_json(result_path))
                continue
            snap_path = ddir / f"rewind_{k.iteration}it.safetensors"
            if not snap_path.exists():
                raise CheckpointError(f"{snap_path} is missing; delete {ddir} to train the dense network again")
            start = load_tensors(snap_path)
            if mask is not None:
                start = _masked_state(start, mask)
            finals = []
            for i, copy_seed in enumerate(hp.copy_seeds):
                ctx.train_stage(stage=f"{_k_dirname(spec)}_copy_{i}", directory=kdir, stem=f"copy_{i}",
                                start_state=start, mask=mask, recipe=job.training.replace(data_order_seed=copy_seed),
                                start=k.iteration, desc=f"k={spec} copy {i + 1}/2", tags={"rewind": spec})
                finals.append(load_tensors(kdir / f"copy_{i}.safetensors"))
            line = instability(ctx.build, finals[0], finals[1], ctx.evals["test"], hp.points, options.device)
            da, db = (l2_distance(f, dense_state, names) for f in finals)
            row = {
                "rewind": spec, "rewind_iteration": k.iteration, "rewind_epochs": k.epochs,
                "density": mask.density() if mask is not None else 1.0,
                "instability": line["instability"], "error_a": line["error_a"], "error_b": line["error_b"],
                "max_error": line["max_error"], "l2_to_dense": (da + db) / 2, "l2_to_dense_a": da,
                "l2_to_dense_b": db, "l2_between": l2_distance(finals[0], finals[1], names),
                "alphas": line["alphas"], "errors": line["errors"],
            }
            write_json(result_path, row)
            rows.append(row)
            log_line(options, f"stability k={spec}: instability {_pct(row['instability'])} "
                              f"(errors {_pct(row['error_a'])}, {_pct(row['error_b'])}, max {_pct(row['max_error'])}), "
                              f"L2 to dense {row['l2_to_dense']:.4f}")
        table_rows = [{k2: v for k2, v in r.items() if k2 not in ("alphas", "errors")} for r in rows]
        write_metrics_csv(folder / "stability.csv", table_rows)
        from lottery.io import atomic_write_bytes
        from lottery.report import format_table

        md = format_table(table_rows, STABILITY_COLUMNS, markdown=True)
        atomic_write_bytes(folder / "stability.md", (md + "\n").encode())
        plot_stability(table_rows, folder / "stability.png",
                       title=f"{job.model.model} on {job.data.dataset}" + (f", density {mask.density():.3f}" if mask is not None else ""))
        results = {
            "kind": job.kind, "model": job.model.model, "dataset": job.data.dataset, "seed": job.seed,
            "mask": hp.mask, "mask_density": mask.density() if mask is not None else 1.0, "points": hp.points,
            "dense_test_accuracy": (dense.get("last") or {}).get("test_accuracy"), "rows": rows,
            "stable_below": 0.02, "run_dir": str(folder),
        }
        write_json(results_path, results)
        write_metrics_csv(folder / "metrics.csv", ctx.rows)
    log_line(options, f"\nstability: {folder}\n" + format_table(table_rows, STABILITY_COLUMNS))
    return results


def plot_stability(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """Instability (%) and L2 distance to the dense network against the rewind point k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["rewind_iteration"])
    xs = list(range(len(rows)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax1.plot(xs, [100 * r["instability"] for r in rows], marker="o")
    ax1.axhline(2.0, color="gray", linestyle="--", label="stable below 2%")
    ax1.set_ylabel("instability (% test error)")
    ax2.plot(xs, [r["l2_to_dense"] for r in rows], marker="o", color="tab:orange")
    ax2.set_ylabel("L2 distance to dense")
    for ax in (ax1, ax2):
        ax.set_xticks(xs, [r["rewind"] for r in rows])
        ax.set_xlabel("rewind point k")
        ax.grid(True, alpha=0.3)
    ax1.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    from lottery.io import save_figure

    save_figure(fig, Path(path), dpi=120)  # atomic: a kill while plotting leaves no truncated image
    plt.close(fig)
