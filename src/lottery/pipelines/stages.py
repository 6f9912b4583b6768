"""What the IMP-family jobs share: the context of one run folder (data, loaders, rewind state, resumable
training stages) and small helpers for their results."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from lottery import masking
from lottery.cost import add_cost
from lottery.engine import Callback, Trainer
from lottery.engine.schedule import LRSchedule
from lottery.errors import CheckpointError, ConfigError
from lottery.experiment import MetricsCSV, RunOptions, build_model, load_data, make_loaders, prune_ignore
from lottery.hparams import DataHparams, Hparams, ModelHparams, TrainingHparams
from lottery.io import read_json, remove_if_exists, save_tensors, write_json
from lottery.masks import Mask
from lottery.methods.cs import EnforceMaskCallback
from lottery.methods.imp import derived_seed
from lottery.step import Step


#: ``callbacks(stage)`` returns extra callbacks for one training stage (``'level_2'``,
#: ``'level_2_continued'``, ``'control'``, ``'dense'``, ``'k_1ep_copy_0'``): progress hooks, loggers, tests.
StageCallbacks = Callable[[str], Sequence[Callback]]


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
