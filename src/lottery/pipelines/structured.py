"""Structured tickets (refill, refill+, regroup) as resumable jobs on an existing CS or IMP run folder.

``run_structure``: one structured ticket from a finished CS ticket search (its ``mask.safetensors``, the
final search weights of its last round for the L1 scores, its ``rewind.safetensors``) or from one level of
an IMP / IMP-C run (``level_<L>/mask.safetensors``, ``level_<L>/model.safetensors``, the run's rewind
state). The structured mask is retrained from the rewind point k to the end, like the source's tickets.
Folder layout (each file marks a finished stage)::

    structure-<refill|refill-plus|regroup|nm>_<model>_<dataset>_s<seed>_<hash>/
      hparams.json            data/model/training of the source, the structured hparams, the source run
      mask.safetensors/.json  the structured mask over the prunable weights
      channel_mask.safetensors  bias/BatchNorm entries of the channels the mask removes (trained at 0)
      model.safetensors       the retrained ticket (plain state dict), history.json
      metrics.csv, results.json

``run_structured_imp``: the structure step *inside* the IMP loop (SLT's procedure): starting from an IMP
run's dense level 0 and rewind state, level L prunes the trained weights of level L-1 by magnitude (the
source's rate and scope), makes the result structured, and retrains it from k; level L+1 prunes from
there. Its folder (``structure-imp-<method>_...``) has ``level_<L>/`` like an IMP run; ``levels`` is not
part of its name, so asking for more levels continues it. Nothing in :mod:`lottery.pipelines.imp` changes.

The channels a structured mask removes also get their bias and BatchNorm weight/bias pruned (kept at 0),
so they output exactly zero and :func:`lottery.export.export_model` removes them from the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lottery.cost import add_cost
from lottery import masking
from lottery.engine import Trainer
from lottery.errors import CheckpointError, ConfigError
from lottery.experiment import (
    MetricsCSV, RunOptions, build_model, build_model_without_data, check_run_model_known, describe_run,
    finished_results, folder_lock,
    input_normalisation, load_data, log_line, make_loaders, nominal_shape, prepare_run_folder, reuse_finished,
    run_folder_name, write_results,
)
from lottery.export import ExportError, coupled_layers, dead_channel_params
from lottery.hparams import DataHparams, Hparams, ModelHparams, TrainingHparams
from lottery.io import load_tensors, read_json, remove_if_exists, save_tensors, write_json
from lottery.masks import Mask
from lottery.methods.cs import CSHparams, EnforceMaskCallback
from lottery.methods.imp import IMPHparams, derived_seed, magnitude_prune
from lottery.methods.nm import LOGITS_SUFFIX
from lottery.methods.structured import PartitionFn, StructuredHparams, structure
from lottery.step import Step

__all__ = ["StructureJob", "StructuredIMPJob", "load_run_network", "read_source", "run_structure",
           "run_structured_imp", "structured_mask"]

_SLUG = {"refill": "refill", "refill+": "refill-plus", "regroup": "regroup", "nm": "nm"}


@dataclass(frozen=True)
class _SourceHparams(Hparams):
    """Names the source of a structured run in its folder hash."""

    source: str = ""
    level: int = -1
    after: str = ""
    every_level: bool = False

    _prefix = "source"


@dataclass
class StructureJob:
    source: Path
    structured: StructuredHparams = field(default_factory=StructuredHparams)
    after: str | None = None  # 'cs' | 'imp'; None: from the source's hparams.json
    level: int | None = None  # IMP: the level to structure; None: the last finished one


@dataclass
class StructuredIMPJob:
    source: Path  # an IMP run: its level 0 (dense) and rewind state are reused
    structured: StructuredHparams = field(default_factory=StructuredHparams)
    levels: int = 3


# -- reading run folders -------------------------------------------------------------------------------
@dataclass
class Source:
    folder: Path
    after: str  # cs | imp
    kind: str
    seed: int
    data: DataHparams
    model: ModelHparams
    training: TrainingHparams
    rewind: str
    level: int | None
    mask: Mask
    weights: dict[str, torch.Tensor]
    info: dict[str, Any]  # accuracies and epochs of the source, where known


def _desc(folder: Path) -> dict[str, Any]:
    hp_file = folder / "hparams.json"
    if not hp_file.exists():
        raise ConfigError(f"{folder} is not a run folder (no hparams.json)")
    desc = read_json(hp_file)
    check_run_model_known(folder, desc)
    return desc


def _last_level(folder: Path) -> int:
    levels = [int(p.parent.name.split("_")[1]) for p in folder.glob("level_*/results.json")]
    if not levels:
        raise ConfigError(f"{folder} has no finished level yet")
    return max(levels)


def _read_optional(path: Path) -> dict[str, Any]:
    return read_json(path) if path.exists() else {}


def read_source(folder: str | Path, after: str | None = None, level: int | None = None) -> Source:
    """The mask, trained weights, rewind point and recipe of a CS ticket search or of an IMP level."""
    folder = Path(folder)
    desc = _desc(folder)
    kind = desc.get("kind")
    found = "cs" if kind == "search-cs" else "imp" if kind in ("search-imp", "search-imp-c") else None
    if found is None:
        raise ConfigError(f"{folder} is a {kind!r} run; structured tickets need a CS ticket search "
                          "(lottery search cs) or an IMP run (lottery search imp / imp-c), whose rewind state "
                          "they retrain")
    if after is not None and after != found:
        raise ConfigError(f"--after {after} does not match {folder}, which is a {kind} run (--after {found})")
    common = dict(folder=folder, after=found, kind=kind, seed=int(desc["seed"]),
                  data=DataHparams.from_dict(desc["data"]), model=ModelHparams.from_dict(desc["model"]),
                  training=TrainingHparams.from_dict(desc["training"]))
    if not (folder / "rewind.safetensors").exists():
        raise ConfigError(f"{folder} has no rewind.safetensors yet (the run has not passed its rewind point)")
    if found == "cs":
        if level is not None:
            raise ConfigError("--level applies to IMP runs; a CS search has one mask")
        cs = CSHparams.from_dict(desc["cs"])
        mask_path = folder / "mask.safetensors"
        state_path = folder / f"round_{cs.rounds - 1}" / "state.safetensors"
        if not mask_path.exists() or not state_path.exists():
            raise ConfigError(f"the CS search in {folder} has not finished (no {mask_path.name} or {state_path})")
        # The search's final weights are raw (not multiplied by the mask): refill scores only kept entries.
        raw = load_tensors(state_path)
        weights = masking.to_plain_state_dict(raw, apply_masks=False)
        # nm ranks a CS ticket's weights by their mask logits (the learned scores), kept beside the weights
        weights.update({k: v for k, v in raw.items() if k.endswith(LOGITS_SUFFIX)})
        results = _read_optional(folder / "results.json")
        info = {"source_test_accuracy": results.get("test_accuracy"),
                "dense_test_accuracy": results.get("dense_test_accuracy"),
                "source_epochs": results.get("search_epochs"), "cs_rounds": cs.rounds,
                "cs_round_steps": cs.round_recipe(common["training"]).training_steps}
        return Source(**common, rewind=cs.rewind, level=None, mask=Mask.load(mask_path), weights=weights, info=info)
    imp = IMPHparams.from_dict({**desc["imp"]})
    level = _last_level(folder) if level is None else int(level)
    ldir = folder / f"level_{level}"
    if not (ldir / "results.json").exists():
        raise ConfigError(f"{folder} has no finished level {level} ({ldir / 'results.json'} is missing)")
    results = read_json(ldir / "results.json")
    info = {"source_test_accuracy": results.get("test_accuracy"), "source_epochs": results.get("epochs"),
            "dense_test_accuracy": _read_optional(folder / "level_0" / "results.json").get("test_accuracy"),
            "imp_rate": imp.rate, "imp_scope": imp.scope}
    return Source(**common, rewind=imp.rewind, level=level, mask=Mask.load(ldir / "mask.safetensors"),
                  weights=load_tensors(ldir / "model.safetensors"), info=info)


def load_run_network(folder: str | Path, level: int | None = None) -> tuple[nn.Module, Mask | None, dict[str, Any]]:
    """The trained network of a run folder (plain, weights loaded), its weight mask (None for a dense
    run) and a description ``{"run_dir", "kind", "level", "method"}``. Works for structured runs (and their
    levels), CS ticket searches (the retrained ticket), IMP runs (a level's ticket) and dense runs."""
    folder = Path(folder)
    desc = _desc(folder)
    kind = str(desc.get("kind"))
    if kind.startswith("structure-imp-") or kind.startswith("search-imp"):
        level = _last_level(folder) if level is None else int(level)
        ldir = folder / f"level_{level}"
        weights_path, mask_path = ldir / "model.safetensors", ldir / "mask.safetensors"
    elif kind.startswith("structure-") or kind == "train":
        if level is not None:
            raise ConfigError(f"--level does not apply to a {kind} run")
        weights_path, mask_path = folder / "model.safetensors", folder / "mask.safetensors"
    elif kind == "search-cs":
        weights_path, mask_path = folder / "ticket" / "model.safetensors", folder / "mask.safetensors"
    elif kind == "prune-cs":
        weights_path, mask_path = folder / "pruned" / "model.safetensors", folder / "mask.safetensors"
    else:
        raise ConfigError(f"{folder}: cannot load the network of a {kind!r} run")
    if not weights_path.exists():
        raise ConfigError(f"{folder} has no trained network ({weights_path} is missing): run the command that made "
                          "it (again) to finish or rebuild it")
    model = build_model_without_data(DataHparams.from_dict(desc["data"]), ModelHparams.from_dict(desc["model"]))
    try:
        model.load_state_dict(load_tensors(weights_path))
    except RuntimeError as exc:
        raise CheckpointError(f"{weights_path} does not fit {desc['model']['model']}: {exc}") from None
    if kind != "train" and not mask_path.exists():  # never the unpruned network in place of the ticket
        raise CheckpointError(f"{mask_path} is missing, so {folder} holds no ticket to use; run the command that "
                              "made that run again to rebuild it")
    mask = Mask.load(mask_path) if kind != "train" else None
    method = (desc.get("structured") or {}).get("method") or kind
    return model, mask, {"run_dir": str(folder), "kind": kind, "level": level, "method": method,
                         "model": desc["model"]["model"], "dataset": desc["data"]["dataset"], "seed": desc.get("seed"),
                         # the network's input (C, H, W) from its data set: a user's own model need not say it
                         "input_shape": list(nominal_shape(DataHparams.from_dict(desc["data"]))[0])}


def run_preprocessing(folder: str | Path) -> dict[str, list[float]]:
    """The input normalisation (``mean``, ``std`` per channel) of a run folder's data set, for exports."""
    return input_normalisation(DataHparams.from_dict(_desc(Path(folder))["data"]))


# -- the structured mask and its retraining -------------------------------------------------------------
def structured_mask(model: nn.Module, mask: Mask, weights: dict[str, torch.Tensor], hp: StructuredHparams,
                    partition: PartitionFn | None = None) -> Mask:
    """``structure`` with the model's residual stages coupled for refill (:func:`coupled_layers`)."""
    groups: list[list[str]] = []
    if hp.method != "regroup":
        try:
            groups = coupled_layers(model)
        except ExportError:
            groups = []  # a family the export does not know: no residual coupling (layers refilled alone)
    return structure(mask, weights, hp, groups=groups, partition=partition)


def _channels(mask: Mask) -> dict[str, list[int]]:
    """Rows (output channels / neurons) with at least one kept weight, and all rows, per layer."""
    return {n: [int(m.reshape(m.shape[0], -1).any(1).sum()), int(m.shape[0])] for n, m in mask.items()}


class _Stage:
    """Data, loaders and a resumable 'retrain this mask from the rewind state' stage for one source."""

    def __init__(self, folder: Path, src: Source, options: RunOptions):
        self.folder, self.src, self.options = folder, src, options
        self.bundle = load_data(src.data, options)
        self.train_loader, self.evals = make_loaders(self.bundle, src.training, src.seed, options)
        self.ipe = len(self.train_loader)
        self.k = Step.parse(src.rewind, self.ipe)
        self.end = Step.parse(src.training.training_steps, self.ipe)
        self.rows: list[dict[str, Any]] = []

    def build(self) -> nn.Module:
        return build_model(self.src.model, self.bundle, self.src.seed)

    @property
    def retrain_epochs(self) -> float:
        return (self.end.iteration - self.k.iteration) / self.ipe

    def load(self, directory: Path) -> dict[str, Any] | None:
        """A finished stage's record (its rows join metrics.csv), or None when it has not finished."""
        out, hist = directory / "model.safetensors", directory / "history.json"
        if not (out.exists() and hist.exists()):
            return None
        record = read_json(hist)
        self.rows += record["rows"]
        return record

    def train(self, directory: Path, mask: Mask, stage: str, desc: str, tags: dict[str, Any]) -> dict[str, Any]:
        done = self.load(directory)
        if done is not None:
            return done
        hist = directory / "history.json"
        directory.mkdir(parents=True, exist_ok=True)
        model = self.build()
        rewind = load_tensors(self.src.folder / "rewind.safetensors")
        try:
            model.load_state_dict(rewind)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.src.folder / 'rewind.safetensors'} does not fit the model: {exc}") from None
        masking.attach_hard_mask(model, mask)
        tags = {"stage": stage, **tags}
        callbacks = [EnforceMaskCallback(), MetricsCSV(self.folder / "metrics.csv", prefix_rows=list(self.rows), extra=tags,
                              tensorboard=self.options.tensorboard)]
        torch.manual_seed(derived_seed(self.src.seed, f"stage:{stage}"))
        trainer = Trainer(model, self.train_loader, self.src.training, eval_loaders=self.evals, callbacks=callbacks,
                          device=self.options.device, checkpoint_path=directory / "checkpoint.safetensors",
                          start=self.k.iteration, progress=self.options.progress, desc=desc, log=self.options.log)
        history = trainer.fit()
        if masking.current_mask(model) != mask:
            raise AssertionError(f"the mask changed while training {stage}")  # an internal invariant
        masking.remove_masks(model)
        rows = [{**tags, **r} for r in history]
        record = {"rows": rows, "wall_seconds": trainer.wall_seconds, "last": rows[-1] if rows else {}}
        write_json(hist, record)
        save_tensors(directory / "model.safetensors", model.state_dict())
        remove_if_exists(directory / "checkpoint.safetensors")
        self.rows += rows
        return record


def _training_mask(model: nn.Module, mask: Mask, path: Path) -> Mask:
    def make() -> Mask:
        try:
            return dead_channel_params(model, mask)
        except ExportError:
            return Mask()  # a family the export does not know: nothing to prepare for it

    extra = Mask.load_or_create(path, make)
    return Mask({**dict(mask.items()), **dict(extra.items())})


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


# -- after a CS search or an IMP level -----------------------------------------------------------------
def run_structure(job: StructureJob, options: RunOptions, *, partition: PartitionFn | None = None) -> dict[str, Any]:
    """Make the source's mask structured, retrain it from the rewind point; return ``results.json``."""
    hp = job.structured.identity()
    src = read_source(job.source, job.after, job.level)
    ident = _SourceHparams(source=src.folder.resolve().name, level=-1 if src.level is None else src.level, after=src.after)
    kind = f"structure-{_SLUG[hp.method]}"
    folder = options.out / run_folder_name(kind, src.data, src.model, src.training, hp, ident, seed=src.seed)
    desc = describe_run(kind, src.seed, data=src.data, model=src.model, training=src.training, structured=hp)
    desc["source"] = ident.to_dict()
    results_path = folder / "results.json"
    done = reuse_finished(folder, desc, options)
    if done is not None:
        return done
    with folder_lock(folder):
        stage = _Stage(folder, src, options)
        model = stage.build()
        mask = Mask.load_or_create(folder / "mask.safetensors", lambda: structured_mask(model, src.mask, src.weights, hp, partition))
        train_mask = _training_mask(model, mask, folder / "channel_mask.safetensors")
        where = f"level {src.level}" if src.level is not None else "the CS search"
        log_line(options, f"{hp.method} of {where}: density {src.mask.density():.4f} -> {mask.density():.4f}")
        record = stage.train(folder, train_mask, "ticket", f"{hp.method} ticket", {"method": hp.method})
        source_epochs = src.info.get("source_epochs")
        if source_epochs is None and src.after == "cs":
            source_epochs = src.info["cs_rounds"] * Step.parse(src.info["cs_round_steps"], stage.ipe).epochs
        last = record.get("last") or {}
        results = {
            "kind": kind, "method": hp.method, "after": src.after, "level": src.level,
            "model": src.model.model, "dataset": src.data.dataset, "seed": src.seed,
            "density": mask.density(), "kept_weights": mask.num_kept(), "prunable_weights": mask.num_total(),
            "source_density": src.mask.density(), "channels": _channels(mask),
            "test_accuracy": last.get("test_accuracy"), "val_accuracy": last.get("val_accuracy"),
            "test_loss": last.get("test_loss"),
            "source_test_accuracy": src.info.get("source_test_accuracy"),
            "dense_test_accuracy": src.info.get("dense_test_accuracy"),
            # Every epoch spent to obtain this ticket, whatever the source: the source's epochs that produced
            # the mask and the weights it was scored by (a CS search's rounds, without its own ticket's
            # retraining; an IMP level's chain up to and including that level), plus this retraining.
            "source_epochs": source_epochs, "retrain_epochs": stage.retrain_epochs,
            "epochs": (source_epochs or 0.0) + stage.retrain_epochs,
            "rewind": src.rewind, "wall_seconds": record.get("wall_seconds"),
            "structured": hp.to_dict(), "source_run": str(src.folder), "run_dir": str(folder),
        }
        add_cost(results, model, mask, nominal_shape(src.data)[0], folder / "mask.json")
        write_results(results_path, results)
    log_line(options, f"{hp.method} ticket after {src.after} ({where}): density {results['density']:.4f}, "
                      f"test {_pct(results['test_accuracy'])} (source ticket {_pct(results['source_test_accuracy'])}, "
                      f"dense {_pct(results['dense_test_accuracy'])})")
    return results


# -- inside the IMP loop -------------------------------------------------------------------------------
def run_structured_imp(job: StructuredIMPJob, options: RunOptions, *,
                       partition: PartitionFn | None = None) -> dict[str, Any]:
    """IMP with the structure step at every level (module docstring); return the per-level summary."""
    hp = job.structured.identity()
    if not isinstance(job.levels, int) or job.levels < 1:
        raise ConfigError(f"levels must be a positive integer, got {job.levels!r}")
    src = read_source(job.source, "imp", 0)
    imp = IMPHparams.from_dict(_desc(src.folder)["imp"])
    ident = _SourceHparams(source=src.folder.resolve().name, after="imp", every_level=True)
    kind = f"structure-imp-{_SLUG[hp.method]}"
    folder = options.out / run_folder_name(kind, src.data, src.model, src.training, hp, ident, seed=src.seed)
    desc = describe_run(kind, src.seed, data=src.data, model=src.model, training=src.training, structured=hp)
    desc["source"] = ident.to_dict()
    desc["imp"] = {"rate": imp.rate, "scope": imp.scope, "rewind": imp.rewind}
    prepare_run_folder(folder, desc)
    dense_acc = src.info.get("source_test_accuracy")
    with folder_lock(folder):
        stage = _Stage(folder, src, options)
        model = stage.build()
        prev_mask, prev_weights = src.mask, src.weights  # level 0 of the IMP run: dense
        levels = []
        for level in range(1, job.levels + 1):
            ldir = folder / f"level_{level}"
            results_path = ldir / "results.json"
            result = finished_results(results_path, options)
            if result is not None:
                stage.load(ldir)
            else:
                ldir.mkdir(parents=True, exist_ok=True)
                pruned = Mask.load_or_create(ldir / "pruned_mask.safetensors",
                                    lambda: magnitude_prune(prev_weights, prev_mask, imp.rate, imp.scope))
                mask = Mask.load_or_create(ldir / "mask.safetensors",
                                  lambda: structured_mask(model, pruned, prev_weights, hp, partition))
                train_mask = _training_mask(model, mask, ldir / "channel_mask.safetensors")
                record = stage.train(ldir, train_mask, f"level_{level}", f"{hp.method} imp level {level}/{job.levels}",
                                     {"level": level, "method": hp.method})
                last = record.get("last") or {}
                result = {
                    "kind": kind, "method": hp.method, "after": "imp", "level": level, "model": src.model.model,
                    "dataset": src.data.dataset, "seed": src.seed, "density": mask.density(),
                    "kept_weights": mask.num_kept(), "prunable_weights": mask.num_total(),
                    "pruned_density": pruned.density(), "channels": _channels(mask),
                    "test_accuracy": last.get("test_accuracy"), "val_accuracy": last.get("val_accuracy"),
                    "test_loss": last.get("test_loss"), "dense_test_accuracy": dense_acc,
                    "epochs": stage.end.epochs + level * stage.retrain_epochs, "rewind": src.rewind,
                    "wall_seconds": record.get("wall_seconds"), "level_dir": str(ldir),
                }
                add_cost(result, model, mask, nominal_shape(src.data)[0], ldir / "mask.json")
                write_results(results_path, result)
                log_line(options, f"{hp.method} imp level {level}/{job.levels}: density {result['density']:.4f} "
                                  f"(pruned {result['pruned_density']:.4f}), test {_pct(result['test_accuracy'])} "
                                  f"(dense {_pct(dense_acc)})")
            levels.append(result)
            prev_mask = Mask.load(ldir / "mask.safetensors")
            prev_weights = load_tensors(ldir / "model.safetensors")
        summary = {"kind": kind, "method": hp.method, "after": "imp", "model": src.model.model,
                   "dataset": src.data.dataset, "seed": src.seed, "rate": imp.rate, "scope": imp.scope,
                   "rewind": src.rewind, "dense_test_accuracy": dense_acc, "levels": levels,
                   "structured": hp.to_dict(), "source_run": str(src.folder), "run_dir": str(folder)}
        write_results(folder / "results.json", summary)
    return summary
