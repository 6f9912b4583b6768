"""Stochastic-L0 (hard concrete) ticket search and pruning as resumable jobs over a run folder, the
counterpart of :mod:`lottery.pipelines.cs` (same stages, files and results).

Folder layout (each file marks a finished stage; a killed run restarts at the first missing one)::

    search-l0_<model>_<dataset>_s<seed>_<hash>/      (prune-l0_... in pruning mode)
      hparams.json
      rewind.safetensors          raw weights and buffers at the rewind point k          [ticket mode]
      search/state.safetensors    weights + log_alpha at the end of the search
      search/history.json         the search's metrics rows
      search/checkpoint.safetensors   while searching
      mask.safetensors, mask.json the final hard mask z > 0 (test-time gate) and its sparsity report
      ticket/model.safetensors    the retrained ticket (pruned weights exactly 0)          [ticket mode]
      pruned/model.safetensors    final weights x test-time gate, optionally fine-tuned     [prune mode]
      metrics.csv, results.json

Ticket mode: the mask applied to the rewind-point weights (saved during the search, as CS does during
its round 0) and trained from k to the end of the recipe with a fresh optimizer. Pruning mode: the
network the search ends with in evaluation mode, i.e. the weights times their deterministic gates
(``w * z``, exactly 0 where ``z = 0``), evaluated, then optionally fine-tuned at the final learning rate
with the mask fixed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lottery import masking
from lottery.cost import add_cost
from lottery.engine import Trainer, evaluate
from lottery.errors import CheckpointError, ConfigError
from lottery.experiment import (
    DenseJob, MetricsCSV, RunOptions, build_model, copy_finished_files, describe_run, folder_lock, load_data,
    log_line, make_loaders, prune_ignore, reuse_finished, rewind_point, run_folder_name, train_dense,
    write_metrics_csv, write_results,
)
from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
from lottery.io import load_tensors, read_json, remove_if_exists, save_tensors, write_json
from lottery.masks import Mask
from lottery.methods.cs import EnforceMaskCallback
from lottery.methods.imp import derived_seed
from lottery.methods.l0 import (
    L0Hparams, L0SnapshotCallback, attach_from_hparams, expected_density, l0_hard_mask, make_l0_optimizers,
    remove_l0_gates, search_callbacks,
)
from lottery.step import Step


@dataclass
class L0Job:
    data: DataHparams = field(default_factory=DataHparams)
    model: ModelHparams = field(default_factory=ModelHparams)
    training: TrainingHparams = field(default_factory=TrainingHparams)
    l0: L0Hparams = field(default_factory=L0Hparams)
    seed: int = 0
    mode: str = "ticket"  # ticket: retrain mask x rewind state; prune: final weights x gates
    dense_reference: bool = True  # also train (or reuse) the dense network of the same recipe

    def __post_init__(self) -> None:
        if self.mode not in ("ticket", "prune"):
            raise ConfigError(f"L0 mode must be 'ticket' or 'prune', got {self.mode!r}")

    @property
    def kind(self) -> str:
        return "search-l0" if self.mode == "ticket" else "prune-l0"


def _check_rewind_fits(job: L0Job, ipe: int) -> Step:
    return rewind_point(job.l0.rewind, job.training, job.l0.search_recipe(job.training).training_steps, ipe,
                        ticket=job.mode == "ticket", owner="L0Hparams.rewind")


def run_l0(job: L0Job, options: RunOptions) -> dict[str, Any]:
    """Run (or resume, or reuse) a stochastic-L0 ticket search or L0 pruning; return ``results.json``'s content."""
    hp = job.l0
    folder = options.out / run_folder_name(job.kind, job.data, job.model, job.training, hp, seed=job.seed)
    desc = describe_run(job.kind, job.seed, data=job.data, model=job.model, training=job.training, l0=hp)
    results_path = folder / "results.json"
    done = reuse_finished(folder, desc, options)
    if done is not None:
        return done

    # Impossible settings (a rewind point after the end) fail before any training, dense included.
    bundle = load_data(job.data, options)
    train_loader, evals = make_loaders(bundle, job.training, job.seed, options)
    ipe = len(train_loader)
    k = _check_rewind_fits(job, ipe)

    dense = None
    if job.dense_reference:
        dense = train_dense(DenseJob(job.data, job.model, job.training, seed=job.seed), options, wait_for_lock=True)

    with folder_lock(folder):
        recipe = hp.search_recipe(job.training)
        rows: list[dict[str, Any]] = []

        # -- the search -------------------------------------------------------------------------------
        model = build_model(job.model, bundle, job.seed)
        names = list(masking.prunable_weights(model, ignore=prune_ignore(job.model)))
        gen = torch.Generator().manual_seed(derived_seed(job.seed, "l0-init"))
        attach_from_hparams(model, names, hp, generator=gen)
        sdir = folder / "search"
        state_path = sdir / "state.safetensors"
        rewind_path = folder / "rewind.safetensors"
        if not state_path.exists():
            _reuse_sibling_search(job, options, folder, k)
        if state_path.exists():
            model.load_state_dict(load_tensors(state_path))
            done = read_json(sdir / "history.json")
            rows += done["rows"]
            wall = done["wall_seconds"]
        else:
            sdir.mkdir(parents=True, exist_ok=True)
            callbacks = search_callbacks(hp)
            if k <= Step.parse(recipe.training_steps, ipe):
                # Saved in both modes (it costs one copy of the weights): the other mode's run of the same
                # hparams can then reuse this search (_reuse_sibling_search).
                callbacks.append(L0SnapshotCallback(k.iteration, lambda sd: save_tensors(rewind_path, sd)))
            callbacks.append(MetricsCSV(folder / "metrics.csv", extra={"stage": "search"}, tensorboard=options.tensorboard))
            # The gates' noise comes from a seed of its own (a resumed search restores the RNG state).
            torch.manual_seed(derived_seed(job.seed, "l0-search"))
            trainer = Trainer(
                model, train_loader, recipe, optimizers=make_l0_optimizers(model, recipe, hp), eval_loaders=evals,
                callbacks=callbacks, device=options.device, checkpoint_path=sdir / "checkpoint.safetensors",
                progress=options.progress, desc="l0 search", log=options.log,
            )
            history = [{"stage": "search", **row} for row in trainer.fit()]
            write_json(sdir / "history.json", {"rows": history, "wall_seconds": trainer.wall_seconds})
            wall = trainer.wall_seconds
            save_tensors(state_path, model.state_dict())
            remove_if_exists(sdir / "checkpoint.safetensors")
            rows += history
        if job.mode == "ticket" and not rewind_path.exists():
            raise CheckpointError(f"{rewind_path} is missing although the search went past the rewind point; "
                                  f"delete {sdir} to search again")
        search_epochs = Step.parse(recipe.training_steps, ipe).epochs
        search_last = rows[-1] if rows else {}

        # -- the hard mask z > 0 ----------------------------------------------------------------------
        mask = l0_hard_mask(model)
        exp_density = expected_density(model)
        mask_path = folder / "mask.safetensors"
        saved = Mask.load_or_create(mask_path, lambda: mask)  # a damaged file is refused, naming it
        if saved.keys() != mask.keys() or any(not torch.equal(saved[n], mask[n]) for n in mask):
            raise CheckpointError(f"{mask_path} is not the mask of this search's final state (changed while the run "
                                  "was stopped?): delete it and run the same command again to rebuild it")
        log_line(options, f"L0 mask: density {mask.density():.4f} ({mask.num_kept()} of {mask.num_total()} weights; "
                          f"expected density while training {exp_density:.4f})")

        if job.mode == "ticket":
            result = _retrain_ticket(job, options, folder, bundle, train_loader, evals, mask, k, rows)
            epochs = search_epochs + (Step.parse(job.training.training_steps, ipe).iteration - k.iteration) / ipe
        else:
            result = _prune(job, options, folder, model, train_loader, evals, mask, recipe, rows)
            epochs = search_epochs + Step.parse(hp.finetune_steps, ipe).epochs

        results = {
            "kind": job.kind,
            "method": "l0",
            "mode": job.mode,
            "model": job.model.model,
            "dataset": job.data.dataset,
            "seed": job.seed,
            "lam": hp.lam,
            "penalty": hp.penalty,
            "init_drop_rate": hp.init_drop_rate,
            "gate_optimizer": hp.gate_optimizer,
            "density": mask.density(),
            "kept_weights": mask.num_kept(),
            "prunable_weights": mask.num_total(),
            "expected_density": exp_density,
            "test_accuracy": result["test_accuracy"],
            "val_accuracy": result.get("val_accuracy"),
            "search_test_accuracy": search_last.get("test_accuracy"),
            "search_epochs": search_epochs,
            "epochs": epochs,
            "rewind": hp.rewind if job.mode == "ticket" else None,
            "wall_seconds": wall + result.pop("stage_wall_seconds", 0.0),
            "run_dir": str(folder),
            **{k2: v for k2, v in result.items() if k2 not in ("test_accuracy", "val_accuracy")},
        }
        if dense is not None:
            results["dense_test_accuracy"] = dense["test_accuracy"]
            results["dense_run_dir"] = dense["run_dir"]
        add_cost(results, model, mask, bundle.input_shape, mask_path.with_suffix(".json"))
        write_results(results_path, results)
        return results


def _reuse_sibling_search(job: L0Job, options: RunOptions, folder: Path, k: Step) -> None:
    """Copy the finished search of the other mode's run of the same hparams, if there is one.

    Why: the search does not depend on the mode (ticket or prune: same seeds, same recipe, the rewind
    snapshot only reads the weights), so a ticket and a pruned network of one setting need only one
    search. A search counts as finished when its ``state.safetensors`` exists (written last, atomically);
    a ticket also needs the sibling's rewind point. Nothing is copied otherwise, and this run searches.
    """
    other = dataclasses.replace(job, mode="prune" if job.mode == "ticket" else "ticket")
    sibling = options.out / run_folder_name(other.kind, other.data, other.model, other.training, other.l0, seed=job.seed)
    files = ["search/history.json", "search/state.safetensors"] + (["rewind.safetensors"] if job.mode == "ticket" else [])
    # a pruning run keeps the rewind point too when there is one, so that a later ticket run can reuse it
    if not copy_finished_files(sibling, folder, files, last="search/state.safetensors", optional=("rewind.safetensors",)):
        return
    write_metrics_csv(folder / "metrics.csv", read_json(folder / "search/history.json")["rows"])
    log_line(options, f"{folder}: reusing the finished L0 search of {sibling} (the search is the same in both modes)")


def _retrain_ticket(job: L0Job, options, folder: Path, bundle, train_loader, evals, mask: Mask, k: Step,
                    rows) -> dict[str, Any]:
    """Mask x rewind-point state, trained from k to the end with a fresh optimizer."""
    tdir = folder / "ticket"
    tdir.mkdir(exist_ok=True)
    model = build_model(job.model, bundle, job.seed)
    rewind_file = folder / "rewind.safetensors"
    try:
        model.load_state_dict(load_tensors(rewind_file))
    except RuntimeError as e:
        raise CheckpointError(f"{rewind_file} does not fit the model: {e}") from None
    masking.attach_hard_mask(model, mask)
    torch.manual_seed(derived_seed(job.seed, "l0-ticket"))
    trainer = Trainer(
        model, train_loader, job.training, eval_loaders=evals, device=options.device, start=k.iteration,
        callbacks=[EnforceMaskCallback(), MetricsCSV(folder / "metrics.csv", prefix_rows=rows, extra={"stage": "ticket"}, tensorboard=options.tensorboard)],
        checkpoint_path=tdir / "checkpoint.safetensors", progress=options.progress, desc="l0 ticket", log=options.log,
    )
    history = trainer.fit()
    if masking.current_mask(model) != mask:
        raise AssertionError("the ticket's mask changed during retraining")  # an internal invariant
    masking.remove_masks(model)
    save_tensors(tdir / "model.safetensors", model.state_dict())
    remove_if_exists(tdir / "checkpoint.safetensors")
    last = history[-1] if history else {}
    return {"test_accuracy": last.get("test_accuracy"), "val_accuracy": last.get("val_accuracy"),
            "test_loss": last.get("test_loss"), "stage_wall_seconds": trainer.wall_seconds}


def _prune(job: L0Job, options, folder: Path, model, train_loader, evals, mask: Mask, recipe: TrainingHparams,
           rows) -> dict[str, Any]:
    """Final weights x test-time gates (exact zeros where z = 0), evaluated; then optionally fine-tuned."""
    from lottery.pipelines.stages import final_lr_recipe

    pdir = folder / "pruned"
    pdir.mkdir(exist_ok=True)
    baked = remove_l0_gates(model, bake=True)
    if baked != mask:
        raise AssertionError("the mask of the baked gates differs from z > 0")  # an internal invariant
    model.to(options.device)
    before = {split: evaluate(model, loader, options.device) for split, loader in evals.items()}
    out: dict[str, Any] = {
        "test_accuracy_before_finetune": before["test"]["top1"],
        "test_accuracy": before["test"]["top1"],
        "val_accuracy": before["val"]["top1"] if "val" in before else None,
        "test_loss": before["test"]["loss"],
    }
    ipe = len(train_loader)
    ft = Step.parse(job.l0.finetune_steps, ipe)
    out["finetune_epochs"] = ft.epochs
    if ft.iteration > 0:
        masking.attach_hard_mask(model, mask)
        torch.manual_seed(derived_seed(job.seed, "l0-finetune"))
        trainer = Trainer(
            model, train_loader, final_lr_recipe(recipe, job.l0.finetune_steps, ipe), eval_loaders=evals,
            device=options.device,
            callbacks=[EnforceMaskCallback(), MetricsCSV(folder / "metrics.csv", prefix_rows=rows, extra={"stage": "finetune"}, tensorboard=options.tensorboard)],
            checkpoint_path=pdir / "checkpoint.safetensors", progress=options.progress, desc="l0 fine-tune",
            log=options.log,
        )
        history = trainer.fit()
        out["stage_wall_seconds"] = trainer.wall_seconds
        out["test_accuracy"] = history[-1].get("test_accuracy")
        out["val_accuracy"] = history[-1].get("val_accuracy")
        out["test_loss"] = history[-1].get("test_loss")
        if masking.current_mask(model) != mask:
            raise AssertionError("the mask changed during fine-tuning")  # an internal invariant
        masking.remove_masks(model)
        remove_if_exists(pdir / "checkpoint.safetensors")
    save_tensors(pdir / "model.safetensors", model.state_dict())
    return out
