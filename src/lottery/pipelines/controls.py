"""Random controls of a saved IMP level (random pruning, random re-initialisation), as resumable jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any


from lottery import masking
from lottery.errors import ConfigError
from lottery.experiment import (
    RunOptions, check_run_model_known, describe_run, folder_lock, log_line, reuse_finished, run_folder_name,
    write_results,
)
from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
from lottery.io import load_tensors, read_json, write_json
from lottery.masks import Mask
from lottery.methods.imp import IMPHparams, RandomPruneHparams, RandomReinitHparams, random_prune, random_reinit
from lottery.pipelines.stages import (
    StageCallbacks, _Context, _accuracies, _identity_dict, _mask_counts, _masked_state, _pct,
)


# -- controls on a saved IMP level ---------------------------------------------------------------------------
def _load_source(source: Path) -> dict[str, Any]:
    source = Path(source)
    hp_file = source / "hparams.json"
    if not hp_file.exists():
        raise ConfigError(f"{source} is not a run folder (no hparams.json)")
    desc = read_json(hp_file)
    check_run_model_known(source, desc)
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
        write_results(results_path, results)
    log_line(options, f"{control} control of level {hp.level} (density {results['density']:.4f}, run seed {results['seed']}, "
                      f"control seed {hp.seed}): "
                      f"test {_pct(results['test_accuracy'])}, ticket {_pct(results['ticket_test_accuracy'])}")
    return results
