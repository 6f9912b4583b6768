"""CS ticket search and CS pruning as resumable jobs over a run folder.

Folder layout (each file marks a finished stage; a killed run restarts at the first missing one)::

    search-cs_<model>_<dataset>_s<seed>_<hash>/
      hparams.json
      rewind.safetensors          weights and buffers at the rewind point k (round 0)
      round_0/state.safetensors   weights + mask logits at the end of each round
      round_0/history.json        that round's metrics rows and mask convergence figures
      mask.safetensors, mask.json the final hard mask 1[s > 0] and its sparsity report
      ticket/model.safetensors    the retrained ticket (pruned weights exactly 0)   [ticket mode]
      pruned/model.safetensors    final weights x mask, optionally fine-tuned       [prune mode]
      metrics.csv, results.json
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lottery import masking
from lottery.cost import add_cost
from lottery.engine import Trainer, evaluate
from lottery.errors import CheckpointError, ConfigError, LotteryError
from lottery.experiment import (
    DenseJob, MetricsCSV, RunOptions, build_model, copy_finished_files, describe_run, folder_lock, load_data,
    log_line, make_loaders, prune_ignore, reuse_finished, rewind_point, run_folder_name, train_dense,
    write_metrics_csv, write_results,
)
from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
from lottery.io import load_tensors, read_json, remove_if_exists, save_tensors, write_json
from lottery.masks import Mask
from lottery.methods.cs import (
    CSHparams, EnforceMaskCallback, harden_soft_masks, SnapshotCallback, make_search_optimizers, search_round_callbacks,
)
from lottery.methods.cs_convergence import describe, not_converged_message, round_convergence
from lottery.methods.cs_density import DensityCallback
from lottery.step import Step


@dataclass
class CSJob:
    data: DataHparams = field(default_factory=DataHparams)
    model: ModelHparams = field(default_factory=ModelHparams)
    training: TrainingHparams = field(default_factory=TrainingHparams)
    cs: CSHparams = field(default_factory=CSHparams)
    seed: int = 0
    mode: str = "ticket"  # ticket: retrain mask x rewind state; prune: final weights x mask
    dense_reference: bool = True  # also train (or reuse) the dense network of the same recipe

    def __post_init__(self) -> None:
        if self.mode not in ("ticket", "prune"):
            raise ConfigError(f"CS mode must be 'ticket' or 'prune', got {self.mode!r}")

    @property
    def kind(self) -> str:
        return "search-cs" if self.mode == "ticket" else "prune-cs"


# Rounds shorter than this many epochs get a warning under the per-epoch temperature schedule.
SMOOTH_ANNEALING_EPOCHS = 5


def _check_rewind_fits(job: CSJob, ipe: int) -> Step:
    return rewind_point(job.cs.rewind, job.training, job.cs.round_recipe(job.training).training_steps, ipe,
                        ticket=job.mode == "ticket", owner="CSHparams.rewind")


def run_cs(job: CSJob, options: RunOptions) -> dict[str, Any]:
    """Run (or resume, or reuse) a CS ticket search or CS pruning; return ``results.json``'s content."""
    folder = options.out / run_folder_name(job.kind, job.data, job.model, job.training, job.cs, seed=job.seed)
    desc = describe_run(job.kind, job.seed, data=job.data, model=job.model, training=job.training, cs=job.cs)
    done = reuse_finished(folder, desc, options)
    if done is not None:
        if options.strict and done.get("mask_converged") is False:
            raise LotteryError(f"{folder} is finished but its CS mask did not converge (results.json: "
                               "mask_converged false); --strict refuses it: run without --strict to use it")
        return done

    # Impossible settings (a rewind point after the end) fail before any training, dense included.
    bundle = load_data(job.data, options)
    train_loader, evals = make_loaders(bundle, job.training, job.seed, options)
    ipe = len(train_loader)
    k = _check_rewind_fits(job, ipe)

    _log_plan(job, options, ipe, k)
    # Said now, so that a user can follow the run's metrics.csv; the folder itself is made when the search
    # starts (after the dense reference, when there is one).
    log_line(options, f"this search's folder: {folder}")

    dense = None
    if job.dense_reference:
        dense = train_dense(DenseJob(job.data, job.model, job.training, seed=job.seed), options, wait_for_lock=True)

    with folder_lock(folder):
        round_recipe = job.cs.round_recipe(job.training)
        ignore = prune_ignore(job.model)
        rows: list[dict[str, Any]] = []
        wall = 0.0  # training seconds of every stage, also those run before a resume

        # -- search rounds --------------------------------------------------------------------------
        model = build_model(job.model, bundle, job.seed)
        names = list(masking.prunable_weights(model, ignore=ignore))
        s0 = job.cs.initial_logit
        masking.attach_soft_mask(model, names, s0=s0, scale_by_s0=job.cs.scale_by_s0)
        round_iterations = Step.parse(round_recipe.training_steps, ipe).iteration
        previous_mask = masking.hard_mask_from_logits(model)  # 1[s0 > 0]: what round 0's flips count against
        convergence: list[dict[str, Any]] = []
        shifts: list[float] = []
        conv_loader = evals.get("val", evals["test"])
        rewind_path = folder / "rewind.safetensors"
        if job.mode == "prune" and not (folder / "round_0" / "state.safetensors").exists():
            _reuse_ticket_search(job, options, folder)
        for r in range(job.cs.rounds):
            rdir = folder / f"round_{r}"
            state_path = rdir / "state.safetensors"
            if state_path.exists():
                model.load_state_dict(load_tensors(state_path))
                done = read_json(rdir / "history.json")
                rows += done["rows"]
                wall += done["wall_seconds"]
                if done.get("convergence") is not None:
                    convergence.append(done["convergence"])
                    shifts.append(done.get("density_shift", 0.0))
                    _report_convergence(done["convergence"], r, job.cs, options)
                previous_mask = masking.hard_mask_from_logits(model)
                remove_if_exists(rdir / "checkpoint.safetensors")  # left behind when killed right after the state
                continue
            if r > 0:
                # The model holds round r-1's end state (trained or loaded above): no rewinding of
                # weights between rounds, only the logits are reset.
                masking.cs_reset_logits_(model, job.cs.beta_final, s0)
            rdir.mkdir(parents=True, exist_ok=True)
            start_density = 1.0 if (r == 0 and s0 > 0) else masking.hard_mask_from_logits(model).density()
            callbacks = search_round_callbacks(job.cs, r, start_density)
            if r == 0 and job.mode == "ticket":
                callbacks.append(SnapshotCallback(k.iteration, lambda sd: save_tensors(rewind_path, sd)))
            callbacks.append(MetricsCSV(folder / "metrics.csv", prefix_rows=rows, extra={"stage": f"round_{r}"},
                                        tensorboard=options.tensorboard))
            trainer = Trainer(
                model, train_loader, round_recipe,
                optimizers=make_search_optimizers(model, round_recipe, job.cs, round_iterations),
                eval_loaders=evals, callbacks=callbacks, device=options.device,
                checkpoint_path=rdir / "checkpoint.safetensors", progress=options.progress,
                desc=f"cs round {r + 1}/{job.cs.rounds}", log=options.log,
            )
            history = [{"stage": f"round_{r}", **row} for row in trainer.fit()]
            conv = round_convergence(model, conv_loader, options.device, job.cs.beta_final, previous_mask)
            shift = next((cb.total_shift for cb in callbacks if isinstance(cb, DensityCallback)), 0.0)
            if history:
                history[-1].update({"undecided": conv["undecided"], "soft_val_accuracy": conv["soft_val_accuracy"],
                                    "hard_val_accuracy": conv["hard_val_accuracy"], "flips": conv["flips"]})
            write_json(rdir / "history.json", {"rows": history, "wall_seconds": trainer.wall_seconds,
                                               "convergence": conv, "density_shift": shift})
            write_metrics_csv(folder / "metrics.csv", rows + history)
            convergence.append(conv)
            shifts.append(shift)
            previous_mask = masking.hard_mask_from_logits(model)
            wall += trainer.wall_seconds
            save_tensors(state_path, model.state_dict())
            remove_if_exists(rdir / "checkpoint.safetensors")
            rows += history
            _report_convergence(conv, r, job.cs, options)
            _check_round_density(model, job.cs, r, options)
        search_epochs = job.cs.rounds * Step.parse(round_recipe.training_steps, ipe).epochs

        # -- the hard mask ----------------------------------------------------------------------------
        mask = _save_final_mask(masking.hard_mask_from_logits(model), folder, job.cs, s0, options)

        if job.mode == "ticket":
            result = _retrain_ticket(job, options, folder, bundle, train_loader, evals, mask, k, rows)
            epochs = search_epochs + (Step.parse(job.training.training_steps, ipe).iteration - k.iteration) / ipe
        else:
            result = _prune(job, options, folder, model, train_loader, evals, mask, round_recipe, rows)
            epochs = search_epochs + Step.parse(job.cs.finetune_steps, ipe).epochs

        results = _results_record(job, folder, s0, convergence, shifts, mask, result, search_epochs, epochs, wall,
                                  dense, model, bundle.input_shape)
        write_results(folder / "results.json", results)
        return results


def _log_plan(job: CSJob, options: RunOptions, ipe: int, k: Step) -> None:
    """The run's plan in one line, and warnings about temperature schedules that cannot anneal."""
    round_epochs = Step.parse(job.cs.round_recipe(job.training).training_steps, ipe).epochs
    total_epochs = Step.parse(job.training.training_steps, ipe).epochs
    retrain = total_epochs - k.epochs if job.mode == "ticket" else Step.parse(job.cs.finetune_steps, ipe).epochs
    log_line(options, f"plan: {'dense reference ' + format(total_epochs, 'g') + ' epochs, ' if job.dense_reference else ''}"
                      f"CS {job.cs.rounds} round(s) x {round_epochs:g} epochs"
                      f"{' (the training length; --round-steps sets it)' if job.cs.round_steps is None else ''}, "
                      f"{'ticket retraining' if job.mode == 'ticket' else 'fine-tuning'} {retrain:g} epochs")
    if job.cs.temperature_schedule == "epoch" and round_epochs < 2:
        log_line(options, "warning: a CS round shorter than 2 epochs cannot anneal the temperature per epoch "
                          "(the whole round runs at beta_final); use --temperature-schedule iteration or longer rounds")
    elif job.cs.temperature_schedule == "epoch" and round_epochs < SMOOTH_ANNEALING_EPOCHS:
        # Seen on Conv-4 (width 0.125) with 2-epoch rounds: beta went 1 -> 200 in one step and the network
        # collapsed to chance accuracy; with a per-iteration beta the same search kept 89.8 % at 5.8 % density.
        log_line(options, f"warning: with {round_epochs:g}-epoch CS rounds a per-epoch temperature takes only "
                          f"{math.ceil(round_epochs)} values from 1 to {job.cs.beta_final:g} (large jumps can "
                          "collapse the network); use --temperature-schedule iteration or longer rounds")


def _save_final_mask(mask: Mask, folder: Path, cs: CSHparams, s0: float, options: RunOptions) -> Mask:
    """Refuse a mask that keeps none or all of the weights; write mask.safetensors (or check the one there)."""
    if mask.num_kept() == 0:
        raise LotteryError(
            f"CS pruned every prunable weight (density 0) in {folder}: there is no ticket to train. "
            f"Ask for a density (--density 0.1) or use a larger --s0 (now {s0:g}) or a smaller --lam (now {cs.lam:g})"
        )
    if mask.num_kept() == mask.num_total():
        raise LotteryError(
            f"CS kept every prunable weight (density 1) in {folder}: that is the dense network, not a ticket. "
            f"Ask for a density (--density 0.1) or use a smaller --s0 (now {s0:g}) or a larger --lam (now {cs.lam:g})"
        )
    mask_path = folder / "mask.safetensors"
    saved = Mask.load_or_create(mask_path, lambda: mask)  # a damaged file is refused, naming it
    if saved.keys() != mask.keys() or any(not torch.equal(saved[n], mask[n]) for n in mask):
        raise CheckpointError(f"{mask_path} is not the mask of this search's final state (changed while the run "
                              "was stopped?): delete it and run the same command again to rebuild it")
    log_line(options, f"CS mask: density {mask.density():.4g} ({mask.num_kept()} of {mask.num_total()} weights)")
    return mask


def _results_record(job: CSJob, folder: Path, s0: float, convergence: list[dict[str, Any]], shifts: list[float],
                    mask: Mask, result: dict[str, Any], search_epochs: float, epochs: float, wall: float,
                    dense: dict[str, Any] | None, model, input_shape) -> dict[str, Any]:
    """``results.json`` of a finished search (shared with the stacked path, lottery.pipelines.cs_stacked)."""
    results = {
        "kind": job.kind,
        "method": "cs",
        "mode": job.mode,
        "model": job.model.model,
        "dataset": job.data.dataset,
        "seed": job.seed,
        "s0": s0,
        "target_density": job.cs.density,
        # the mask is the logits' own 1[s > 0]: no entry is changed after the search to meet the target
        "density_adjusted_entries": 0,
        "density_logit_shift": sum(shifts) if job.cs.density is not None else None,
        "mask_converged": bool(convergence[-1]["converged"]) if convergence else None,
        "convergence": [{"round": i, **c} for i, c in enumerate(convergence)],
        "lam": job.cs.lam,
        "rounds": job.cs.rounds,
        "density": mask.density(),
        "kept_weights": mask.num_kept(),
        "prunable_weights": mask.num_total(),
        "test_accuracy": result["test_accuracy"],
        "val_accuracy": result.get("val_accuracy"),
        "search_epochs": search_epochs,
        "epochs": epochs,
        "rewind": job.cs.rewind if job.mode == "ticket" else None,
        "wall_seconds": wall + result.pop("stage_wall_seconds", 0.0),
        "run_dir": str(folder),
        **{k2: v for k2, v in result.items() if k2 not in ("test_accuracy", "val_accuracy")},
    }
    if dense is not None:
        results["dense_test_accuracy"] = dense["test_accuracy"]
        results["dense_run_dir"] = dense["run_dir"]
    add_cost(results, model, mask, input_shape, folder / "mask.json", job.cs.density)
    return results


def _report_convergence(conv: dict[str, Any], r: int, cs: CSHparams, options: RunOptions) -> None:
    """Log a round's mask figures; a round that did not converge is a warning, or with ``strict`` an error
    (also for a finished round found on disk, so a resumed run says it again)."""
    log_line(options, describe(conv, r, cs.rounds))
    if not conv["converged"]:
        message = not_converged_message(conv, r, default_recipe=cs.mask_optimizer == "adam"
                                        and cs.temperature_schedule == "iteration")
        if options.strict:
            raise LotteryError(f"{message} (--strict; the round is saved: run again without --strict to go on)")
        log_line(options, f"warning: {message}")


def _check_round_density(model, cs: CSHparams, r: int, options: RunOptions) -> None:
    """With a target density, say so if a round ended off its target (the projection should make that
    impossible; a warning rather than silence if it ever happens)."""
    if cs.density is None:
        return
    from lottery.methods.cs_density import keep_count, round_target_density

    mask = masking.hard_mask_from_logits(model)
    wanted = keep_count(round_target_density(cs.density, r, cs.rounds), mask.num_total())
    if mask.num_kept() != wanted:
        log_line(options, f"warning: CS round {r + 1} ended with {mask.num_kept()} weights kept where the density "
                          f"schedule asks for {wanted}")


def _reuse_ticket_search(job: CSJob, options: RunOptions, folder: Path) -> None:
    """Pruning: copy the finished search rounds of the ticket run of the same hparams, if there is one.

    Why: the search does not depend on the mode (same seed, data order and recipe; the ticket run's rewind
    snapshot only reads the weights), so a ticket and a pruned network of one setting need one search.
    Only this direction: a pruning run saves no rewind point, which a ticket needs.
    """
    ticket = dataclasses.replace(job, mode="ticket")
    sibling = options.out / run_folder_name(ticket.kind, ticket.data, ticket.model, ticket.training, ticket.cs,
                                            seed=job.seed)
    files = [f"round_{r}/{name}" for r in range(job.cs.rounds) for name in ("history.json", "state.safetensors")]
    if copy_finished_files(sibling, folder, files, last=f"round_{job.cs.rounds - 1}/state.safetensors"):
        rows = [row for r in range(job.cs.rounds) for row in read_json(folder / f"round_{r}" / "history.json")["rows"]]
        write_metrics_csv(folder / "metrics.csv", rows)
        log_line(options, f"{folder}: reusing the finished CS search of {sibling} (the search is the same in both modes)")


def _retrain_ticket(job, options, folder, bundle, train_loader, evals, mask: Mask, k: Step, rows) -> dict[str, Any]:
    """Mask x rewind-point state, trained from k to the end with a fresh optimizer."""
    tdir = folder / "ticket"
    tdir.mkdir(exist_ok=True)
    model = build_model(job.model, bundle, job.seed)
    rewind = load_tensors(folder / "rewind.safetensors")
    try:
        model.load_state_dict(rewind)
    except RuntimeError as e:
        raise CheckpointError(f"{folder / 'rewind.safetensors'} does not fit the model: {e}") from None
    masking.attach_hard_mask(model, mask)
    trainer = Trainer(
        model, train_loader, job.training, eval_loaders=evals, device=options.device, start=k.iteration,
        callbacks=[EnforceMaskCallback(), MetricsCSV(folder / "metrics.csv", prefix_rows=rows, extra={"stage": "ticket"},
                                                          tensorboard=options.tensorboard)],
        checkpoint_path=tdir / "checkpoint.safetensors", progress=options.progress, desc="ticket", log=options.log,
    )
    history = trainer.fit()
    final_mask = masking.current_mask(model)
    if final_mask != mask:
        raise AssertionError("the ticket's mask changed during retraining")  # an internal invariant
    masking.remove_masks(model)
    save_tensors(tdir / "model.safetensors", model.state_dict())
    remove_if_exists(tdir / "checkpoint.safetensors")
    last = history[-1] if history else {}
    return {"test_accuracy": last.get("test_accuracy"), "val_accuracy": last.get("val_accuracy"),
            "stage_wall_seconds": trainer.wall_seconds}


def _prune(job, options, folder, model, train_loader, evals, mask: Mask, round_recipe, rows) -> dict[str, Any]:
    """The trained network with its soft masks hardened (beta -> infinity: ``w * 1[s > 0] / sigmoid(s0)``
    with the default scaling), evaluated; then optionally fine-tuned at the round's final LR."""
    pdir = folder / "pruned"
    pdir.mkdir(exist_ok=True)
    harden_soft_masks(model, job.cs.initial_logit, job.cs.scale_by_s0)
    model.to(options.device)
    before = {split: evaluate(model, loader, options.device) for split, loader in evals.items()}
    out: dict[str, Any] = {
        "test_accuracy_before_finetune": before["test"]["top1"],
        "test_accuracy": before["test"]["top1"],
        "val_accuracy": before["val"]["top1"] if "val" in before else None,
    }
    ipe = len(train_loader)
    ft = Step.parse(job.cs.finetune_steps, ipe)
    if ft.iteration > 0:
        from lottery.engine.schedule import LRSchedule

        end_iter = Step.parse(round_recipe.training_steps, ipe).iteration
        final_lr = round_recipe.lr * LRSchedule(round_recipe, ipe)(max(0, end_iter - 1))
        recipe = round_recipe.replace(training_steps=job.cs.finetune_steps, lr=final_lr, schedule="constant",
                                      milestones=(), warmup_steps="0it")
        masking.attach_hard_mask(model, mask)
        trainer = Trainer(
            model, train_loader, recipe, eval_loaders=evals, device=options.device,
            callbacks=[EnforceMaskCallback(), MetricsCSV(folder / "metrics.csv", prefix_rows=rows, extra={"stage": "finetune"},
                                                                tensorboard=options.tensorboard)],
            checkpoint_path=pdir / "checkpoint.safetensors", progress=options.progress, desc="fine-tune", log=options.log,
        )
        history = trainer.fit()
        out["stage_wall_seconds"] = trainer.wall_seconds
        out["test_accuracy"] = history[-1].get("test_accuracy")
        out["val_accuracy"] = history[-1].get("val_accuracy")
        masking.remove_masks(model)
        remove_if_exists(pdir / "checkpoint.safetensors")
    save_tensors(pdir / "model.safetensors", model.state_dict())
    return out
