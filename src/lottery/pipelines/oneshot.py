"""One-shot magnitude pruning of the shared dense network, optionally fine-tuned, as a resumable job."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from lottery.engine import evaluate
from lottery.experiment import write_results, DenseJob, RunOptions, describe_run, folder_lock, log_line, reuse_finished, run_folder_name, train_dense
from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
from lottery.io import load_tensors, save_tensors, write_json
from lottery.masks import Mask
from lottery.methods.imp import OneShotHparams, one_shot_magnitude
from lottery.pipelines.stages import (
    StageCallbacks, _Context, _accuracies, _mask_counts, _masked_state, _pct, final_lr_recipe,
)


@dataclass
class OneShotJob:
    data: DataHparams = field(default_factory=DataHparams)
    model: ModelHparams = field(default_factory=ModelHparams)
    training: TrainingHparams = field(default_factory=TrainingHparams)
    oneshot: OneShotHparams = field(default_factory=OneShotHparams)
    seed: int = 0

    kind = "prune-magnitude"
    method = "magnitude"


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
        write_results(results_path, results)
    log_line(options, f"magnitude ({hp.scope}) to density {mask.density():.4f}: test "
                      f"{_pct(results['test_accuracy_before_finetune'])} before fine-tuning, "
                      f"{_pct(results['test_accuracy'])} after (dense {_pct(dense['test_accuracy'])})")
    return results
