"""Gradual magnitude pruning (Zhu & Gupta 2017) as a resumable job over a run folder (the conventions of
:mod:`lottery.pipelines.cs`).

One run of the training recipe from the network's initialisation (the same initial weights as the dense
reference of the same seed), pruning by magnitude on the schedule of :mod:`lottery.methods.gmp` and
training on at the final density to the end. Folder layout::

    prune-gmp_<model>_<dataset>_s<seed>_<hash>/
      hparams.json
      checkpoint.safetensors      while training (weights, masks, optimizer; the run resumes from it)
      history.json                the metrics rows of the run
      mask.safetensors, mask.json the final mask and its sparsity report
      pruned/model.safetensors    the pruned network (plain state dict, pruned weights exactly 0)
      metrics.csv, results.json
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lottery import masking
from lottery.cost import add_cost
from lottery.engine import Trainer
from lottery.experiment import (
    DenseJob, MetricsCSV, RunOptions, build_model, describe_run, folder_lock, load_data, log_line, make_loaders,
    prune_ignore, reuse_finished, run_folder_name, train_dense, write_results,
)
from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
from lottery.io import read_json, remove_if_exists, save_tensors, write_json
from lottery.masks import Mask
from lottery.methods.cs import EnforceMaskCallback
from lottery.methods.gmp import GMPHparams, GMPPruningCallback, attach_gmp_masks, gmp_schedule
from lottery.methods.imp import derived_seed, kept_count
from lottery.step import Step


@dataclass
class GMPJob:
    data: DataHparams = field(default_factory=DataHparams)
    model: ModelHparams = field(default_factory=ModelHparams)
    training: TrainingHparams = field(default_factory=TrainingHparams)
    gmp: GMPHparams = field(default_factory=GMPHparams)
    seed: int = 0
    dense_reference: bool = True  # also train (or reuse) the dense network of the same recipe

    kind = "prune-gmp"
    method = "gmp"


def run_gmp(job: GMPJob, options: RunOptions) -> dict[str, Any]:
    """Run (or resume, or reuse) gradual magnitude pruning; return ``results.json``'s content."""
    hp = job.gmp
    folder = options.out / run_folder_name(job.kind, job.data, job.model, job.training, hp, seed=job.seed)
    desc = describe_run(job.kind, job.seed, data=job.data, model=job.model, training=job.training, gmp=hp)
    results_path = folder / "results.json"
    done = reuse_finished(folder, desc, options)
    if done is not None:
        return done

    bundle = load_data(job.data, options)
    train_loader, evals = make_loaders(bundle, job.training, job.seed, options)
    ipe = len(train_loader)
    schedule = gmp_schedule(hp, job.training, ipe)  # impossible schedules fail before any training

    dense = None
    if job.dense_reference:
        dense = train_dense(DenseJob(job.data, job.model, job.training, seed=job.seed), options, wait_for_lock=True)

    with folder_lock(folder):
        model = build_model(job.model, bundle, job.seed)
        names = list(masking.prunable_weights(model, ignore=prune_ignore(job.model)))
        history_path = folder / "history.json"
        mask_path = folder / "mask.safetensors"
        model_path = folder / "pruned" / "model.safetensors"
        if history_path.exists() and mask_path.exists() and model_path.exists():
            record = read_json(history_path)
            mask = Mask.load(mask_path)
        else:
            attach_gmp_masks(model, names)
            pruning = GMPPruningCallback(schedule, names, hp.scope)
            torch.manual_seed(derived_seed(job.seed, "gmp"))
            trainer = Trainer(
                model, train_loader, job.training, eval_loaders=evals, device=options.device,
                callbacks=[pruning, EnforceMaskCallback(),
                           MetricsCSV(folder / "metrics.csv", extra={"stage": "gmp"}, tensorboard=options.tensorboard)],
                checkpoint_path=folder / "checkpoint.safetensors", progress=options.progress, desc="gmp",
                log=options.log,
            )
            history = [{"stage": "gmp", **row} for row in trainer.fit()]
            full = masking.current_mask(model)
            mask = Mask({n: full[n] for n in names})
            masking.remove_masks(model)
            mask.save(mask_path)
            save_tensors(model_path, model.state_dict())
            record = {"rows": history, "wall_seconds": trainer.wall_seconds,
                      "last": history[-1] if history else {}}
            write_json(history_path, record)
            remove_if_exists(folder / "checkpoint.safetensors")
        expected = (kept_count(hp.density, mask.num_total()) if hp.scope == "global"
                    else sum(kept_count(hp.density, m.numel()) for m in mask.values()))
        if mask.num_kept() != expected:  # an internal invariant: the schedule ends at the target
            raise AssertionError(f"GMP ended with {mask.num_kept()} weights kept, expected {expected}")
        last = record.get("last") or {}
        end = Step.parse(job.training.training_steps, ipe)
        results = {
            "kind": job.kind,
            "method": job.method,
            "model": job.model.model,
            "dataset": job.data.dataset,
            "seed": job.seed,
            "scope": hp.scope,
            "target_density": hp.density,
            "density": mask.density(),
            "kept_weights": mask.num_kept(),
            "prunable_weights": mask.num_total(),
            "test_accuracy": last.get("test_accuracy"),
            "val_accuracy": last.get("val_accuracy"),
            "test_loss": last.get("test_loss"),
            "prune_start_iteration": schedule.t0,
            "prune_end_iteration": schedule.end,
            "prune_every_iterations": schedule.dt,
            "pruning_steps": schedule.n + 1,
            "epochs": end.epochs,
            "wall_seconds": record.get("wall_seconds", 0.0),
            "run_dir": str(folder),
        }
        if dense is not None:
            results["dense_test_accuracy"] = dense["test_accuracy"]
            results["dense_run_dir"] = dense["run_dir"]
        add_cost(results, model, mask, bundle.input_shape, mask_path.with_suffix(".json"), hp.density)
        write_results(results_path, results)
    log_line(options, f"gmp ({hp.scope}) to density {mask.density():.4f}: test "
                      f"{100 * (results['test_accuracy'] or 0):.2f}%"
                      + (f" (dense {100 * dense['test_accuracy']:.2f}%)" if dense else ""))
    return results
