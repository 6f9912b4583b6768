"""The one training loop every method uses.

What it guarantees: the learning rate at iteration i depends only on i (so a ticket retrained from
step k sees exactly the schedule the dense run saw there); the batches of epoch e depend only on the
data seed and e (so a resumed run replays them without replaying earlier epochs); a checkpoint is
written atomically at every epoch end and holds everything needed to continue bit-for-bit on CPU.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lottery.engine.callbacks import Callback
from lottery.engine.checkpoint import load_checkpoint, save_checkpoint
from lottery.engine.evaluate import evaluate
from lottery.engine.schedule import LRSchedule
from lottery.step import Step
from lottery.errors import CheckpointError, ConfigError, NumericalError
from lottery.hparams import TrainingHparams
from lottery.io import FAULT_STEP_ENV, fault_step


def make_optimizer(
    params: Iterable[nn.Parameter] | Sequence[dict],
    hp: TrainingHparams,
    *,
    weight_decay: float | None = None,
) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``params``; ``weight_decay`` overrides the recipe's (CS logits: 0)."""
    wd = hp.weight_decay if weight_decay is None else weight_decay
    params = list(params)
    if hp.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=wd
        )
    else:
        opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=wd)
    for group in opt.param_groups:
        group["base_lr"] = group["lr"]
    return opt


class Trainer:
    """Trains ``model`` from ``start`` to the end of ``hp.training_steps`` with the given optimizers.

    ``eval_loaders`` maps a split name ("val", "test") to a loader evaluated every ``hp.eval_every``
    and at the end. ``checkpoint_path``: where to save at every epoch end and resume from if present.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader,
        hp: TrainingHparams,
        *,
        optimizers: Sequence[torch.optim.Optimizer] | None = None,
        eval_loaders: dict[str, Any] | None = None,
        callbacks: Sequence[Callback] = (),
        device: str | torch.device = "cpu",
        checkpoint_path: str | Path | None = None,
        start: str | int = 0,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        progress: bool = True,
        desc: str = "train",
        log: Callable[[str], None] | None = None,
        defer_loss_check: bool | None = None,
    ):
        self.model = model
        # Under torchrun, forward/backward go through DDP (gradient averaging); callbacks and
        # checkpoints keep using the plain model, so nothing else needs to know.
        self.train_module: nn.Module = model
        self.train_loader = train_loader
        self.hp = hp
        self.device = torch.device(device)
        self.optimizers = list(optimizers) if optimizers is not None else [make_optimizer(model.parameters(), hp)]
        for opt in self.optimizers:
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])
        self.eval_loaders = dict(eval_loaders or {})
        self.callbacks = list(callbacks)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.loss_fn = loss_fn
        self.progress = progress
        self.desc = desc
        self.log = log or _default_log

        self.iterations_per_epoch = len(train_loader)
        if self.iterations_per_epoch == 0:
            raise ValueError("the training loader yields no batches (is the training set smaller than a batch?)")
        self.schedule = LRSchedule(hp, self.iterations_per_epoch)
        self.end = Step.parse(hp.training_steps, self.iterations_per_epoch)
        self.start = Step.parse(start, self.iterations_per_epoch)
        if self.start > self.end:
            raise ValueError(f"start step {self.start} is after the end of training {self.end}")
        self.eval_interval = Step.parse(hp.eval_every, self.iterations_per_epoch).iteration
        self.iteration = self.start.iteration
        self.history: list[dict[str, Any]] = []
        self.wall_seconds = 0.0
        self.last_loss: torch.Tensor | None = None
        self._train_loss_sum = torch.zeros((), device=self.device)
        self._train_loss_count = 0
        self._input_checked = False
        self._channels_last = False
        # Whether a non-finite loss is noticed at once (reading it back every step) or at the next check
        # (every LOSS_CHECK_EVERY steps, before every evaluation and checkpoint). Reading a GPU value back
        # makes the CPU wait for the GPU at every step, so launches can no longer run ahead of the kernels;
        # on the CPU it costs nothing. None: at once on the CPU, deferred elsewhere. Deferred, the steps
        # after the bad one still run (on NaN weights), but no checkpoint or evaluation sees them, and the
        # error names the first bad step all the same.
        self.defer_loss_check = self.device.type != "cpu" if defer_loss_check is None else bool(defer_loss_check)
        self._first_bad_loss = torch.full((), -1, dtype=torch.long, device=self.device)

    # -- public ------------------------------------------------------------------------------------
    @property
    def step(self) -> Step:
        return Step(self.iteration, self.iterations_per_epoch)

    @property
    def epoch(self) -> int:
        return self.iteration // self.iterations_per_epoch

    def lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]

    def fit(self) -> list[dict[str, Any]]:
        """Train to the end (resuming from the checkpoint when there is one); return metrics rows."""
        # The model goes to its device before a checkpoint is loaded: torch puts optimizer state (momentum)
        # next to each parameter as it loads, so loading first would leave it on the CPU beside weights
        # on the GPU, and the first step after a resume would fail.
        self.model.to(self.device)
        self._maybe_resume()
        self._channels_last = use_channels_last(self.model, self.device)
        if self._channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.train()
        from lottery.distributed import is_distributed

        if is_distributed() and self.train_module is self.model:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = DistributedDataParallel(self.model, device_ids=ids)
        for cb in self.callbacks:
            cb.on_fit_start(self)
        t_start = time.perf_counter() - self.wall_seconds
        while self.iteration < self.end.iteration:
            self._run_epoch(t_start)
        self.wall_seconds = time.perf_counter() - t_start
        for cb in self.callbacks:
            cb.on_fit_end(self)
        return self.history

    def evaluate_now(self) -> dict[str, Any]:
        """Evaluate every eval split now and record one metrics row."""
        self._raise_if_loss_was_non_finite()
        row: dict[str, Any] = {"step": self.iteration, "epoch": round(self.step.epochs, 4), "lr": self.lr()}
        if self._train_loss_count:
            row["train_loss"] = (self._train_loss_sum / self._train_loss_count).item()
        for split, loader in self.eval_loaders.items():
            m = evaluate(self.model, loader, self.device)
            row[f"{split}_loss"] = m["loss"]
            row[f"{split}_accuracy"] = m["top1"]
            row[f"{split}_top5"] = m["top5"]
        for cb in self.callbacks:
            cb.on_evaluate(self, row)
        self.history.append(row)
        return row

    # -- the loop ----------------------------------------------------------------------------------
    def _run_epoch(self, t_start: float) -> None:
        epoch = self.epoch
        skip = self.iteration - epoch * self.iterations_per_epoch
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        for cb in self.callbacks:
            cb.on_epoch_start(self, epoch)
        self._train_loss_sum.zero_()
        self._train_loss_count = 0
        t0 = time.perf_counter()
        remaining = min(self.iterations_per_epoch - skip, self.end.iteration - self.iteration)
        batches = itertools.islice(iter(self.train_loader), skip, skip + remaining)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            # disable=None: a bar only on a terminal; into a pipe or a file it would be noise in the log.
            bar = tqdm(total=remaining, desc=f"{self.desc} ep {epoch + 1}/{math.ceil(self.end.epochs)}",
                       leave=False, unit="it", dynamic_ncols=True, disable=None)
        for x, y in batches:
            self._train_step(x, y)
            if FAULT_STEP_ENV in os.environ:  # crash tests (lottery.io): SIGKILL after the Nth step
                fault_step("train")
            if bar is not None:
                bar.update(1)
            if self.iteration % LOSS_CHECK_EVERY == 0:
                self._raise_if_loss_was_non_finite()
            if self.iteration % self.eval_interval == 0 or self.iteration == self.end.iteration:
                row = self.evaluate_now()
                if self.iteration % self.iterations_per_epoch != 0 and self.iteration != self.end.iteration:
                    continue
                self._log_row(row, time.perf_counter() - t0)
        if bar is not None:
            bar.close()
        for cb in self.callbacks:
            cb.on_epoch_end(self, epoch)
        self.wall_seconds = time.perf_counter() - t_start
        self._raise_if_loss_was_non_finite()
        self._check_finite_weights()
        self._save()

    def _check_input(self, x: torch.Tensor) -> None:
        """The library's models know the image shape they were built for: data of another shape is a clear
        error here rather than a matrix-shape error deep inside the forward pass."""
        self._input_checked = True
        expected = getattr(self.model, "input_shape", None)
        if expected is not None and tuple(x.shape[1:]) != tuple(expected):
            raise ConfigError(
                f"{type(self.model).__name__} was built for {'x'.join(map(str, expected))} images but the training "
                f"data has {'x'.join(map(str, x.shape[1:]))}: build the model for the data's shape "
                "(lottery.experiment.build_model does) or use data of the model's shape"
            )

    def _probe_channels_last(self, x: torch.Tensor) -> None:
        """A model whose forward assumes contiguous NCHW activations (``.view`` after a convolution) fails in
        ``channels_last``: try two examples first (eval mode, no gradient, the RNG state restored, so the
        run is unchanged) and fall back to the default layout with one line if it raises."""
        was_training = self.model.training
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                self.model.eval()
                self.model(x[:2])
        except Exception as e:  # noqa: BLE001 - any failure means: do not use the layout
            self.model.to(memory_format=torch.contiguous_format)
            self._channels_last = False
            self.log(f"{self.desc}: channels_last failed on this model ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:120]}); training in the default memory layout")
        finally:
            self.model.train(was_training)

    def _check_finite_weights(self) -> None:
        """A step can turn the weights into inf/NaN while its own loss was finite; checkpointing (or
        reporting) such weights would replace the last good checkpoint with a broken one."""
        params = [p for p in self.model.parameters() if p.is_floating_point() or p.is_complex()]
        if not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            return
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        raise NumericalError(
            f"the weights became infinite or NaN by step {self.step} (iteration {self.iteration}; "
            f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}); the last good checkpoint is kept. Try a "
            f"smaller learning rate (now {self.lr():g}) or, for sparsity methods, a smaller penalty (lam)."
        )

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        mult = self.schedule(self.iteration)
        for opt in self.optimizers:
            for group in opt.param_groups:
                # a group with follow_schedule=False keeps its base LR (CS's Adam logits: see methods/cs.py)
                group["lr"] = group["base_lr"] * (mult if group.get("follow_schedule", True) else 1.0)
        for cb in self.callbacks:
            cb.on_step_start(self)
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if not self._input_checked:
            self._check_input(x)
            if self._channels_last:
                self._probe_channels_last(x)
        loss, task_loss = self._losses(x, y)
        if self.defer_loss_check:
            first = self._first_bad_loss
            first.masked_fill_(~torch.isfinite(loss) & (first < 0), self.iteration)
        elif not torch.isfinite(loss):
            raise self._non_finite(loss, task_loss)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        self.iteration += 1
        self.last_loss = task_loss.detach()
        self._train_loss_sum += self.last_loss
        self._train_loss_count += 1
        for cb in self.callbacks:
            cb.on_step_end(self)

    def _losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to backpropagate and the task loss to record. A method of its own so that a stacked
        trainer (lottery.engine.stacking), whose task loss is one value per member, shares the rest of the step."""
        task_loss = self.loss_fn(self.train_module(x), y)
        loss = task_loss
        for cb in self.callbacks:
            extra = cb.extra_loss(self)
            if extra is not None:
                loss = loss + extra
        return loss, task_loss

    def _raise_if_loss_was_non_finite(self) -> None:
        """The deferred loss check (``defer_loss_check``): one read-back for all the steps since the last."""
        if not self.defer_loss_check:
            return
        first = int(self._first_bad_loss)
        if first >= 0:
            raise NumericalError(
                f"the loss became inf or NaN at step {Step(first, self.iterations_per_epoch)} (iteration {first}); "
                f"the last good checkpoint is kept. Try a smaller learning rate (now {self.lr():g})"
                " or, for sparsity methods, a smaller penalty (lam)."
            )

    def _non_finite(self, loss: torch.Tensor, task_loss: torch.Tensor) -> NumericalError:
        return NumericalError(
            f"the loss became {loss.item()} at step {self.step} (iteration {self.iteration}); the last good "
            f"checkpoint is kept. Try a smaller learning rate (now {self.lr():g})"
            " or, for sparsity methods, a smaller penalty (lam)."
        )

    def _log_row(self, row: dict[str, Any], seconds: float) -> None:
        parts = [f"{self.desc} {self._progress_text(row['step'])}"]
        if "train_loss" in row:
            parts.append(f"loss {row['train_loss']:.4f}")
        for split in self.eval_loaders:
            parts.append(f"{split} {100 * row[f'{split}_accuracy']:.2f}%")
        extras = [k for k in row if k not in {"step", "epoch", "lr", "train_loss"} and not k.startswith(tuple(self.eval_loaders))]
        for k in extras:
            v = row[k]
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        parts.append(f"lr {row['lr']:.3g}")
        parts.append(f"{seconds:.1f}s")
        self.log("  ".join(parts))

    def _progress_text(self, iteration: int) -> str:
        """Whole numbers only: ``epoch 3/10`` when training ends at an epoch boundary, else
        ``iteration 120/200`` (a fraction of an epoch, 0.4651/0.465116, says nothing to a reader)."""
        ipe, end = self.iterations_per_epoch, self.end.iteration
        if end % ipe == 0 and iteration % ipe == 0:
            return f"epoch {iteration // ipe}/{end // ipe}"
        return f"iteration {iteration}/{end}"

    # -- checkpoints -------------------------------------------------------------------------------
    def _save(self) -> None:
        from lottery.distributed import is_main

        if self.checkpoint_path is None or not is_main():
            return
        save_checkpoint(
            self.checkpoint_path,
            model_state=self.model.state_dict(),
            optimizer_states=[opt.state_dict() for opt in self.optimizers],
            info={
                "iteration": self.iteration,
                "iterations_per_epoch": self.iterations_per_epoch,
                "history": self.history,
                "wall_seconds": self.wall_seconds,
                "callbacks": [cb.state_dict() for cb in self.callbacks],
                "hparams": self.hp.to_dict(),
            },
        )

    def _maybe_resume(self) -> None:
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            return
        ckpt = load_checkpoint(self.checkpoint_path)
        info = ckpt.info
        if info.get("iterations_per_epoch") != self.iterations_per_epoch:
            raise CheckpointError(
                f"{self.checkpoint_path} was written with {info.get('iterations_per_epoch')} iterations per epoch, "
                f"this run has {self.iterations_per_epoch}: it belongs to another configuration"
            )
        saved_hp, hp = info.get("hparams") or {}, self.hp.to_dict()
        if saved_hp != hp:
            diffs = [f"{k}: {saved_hp.get(k, '<missing>')!r} there, {hp.get(k, '<missing>')!r} now"
                     for k in sorted(set(saved_hp) | set(hp)) if saved_hp.get(k, "<missing>") != hp.get(k, "<missing>")]
            raise CheckpointError(f"{self.checkpoint_path} was written with other training hparams "
                                  f"({'; '.join(diffs[:8])}); use another output folder or delete the checkpoint")
        try:
            self.model.load_state_dict(ckpt.model_state)
        except RuntimeError as e:
            raise CheckpointError(f"{self.checkpoint_path} does not fit this model: {e}") from None
        if len(ckpt.optimizer_states) != len(self.optimizers):
            raise CheckpointError(f"{self.checkpoint_path} holds {len(ckpt.optimizer_states)} optimizer states, "
                                  f"this run has {len(self.optimizers)}")
        for opt, state in zip(self.optimizers, ckpt.optimizer_states):
            opt.load_state_dict(state)
        for cb, state in zip(self.callbacks, info.get("callbacks", [])):
            cb.load_state_dict(state)
        ckpt.restore_rng()
        self.iteration = int(info["iteration"])
        self.history = list(info.get("history", []))
        self.wall_seconds = float(info.get("wall_seconds", 0.0))
        self.log(f"{self.desc}: resumed from {self.checkpoint_path} at step {self.step}")


CHANNELS_LAST_ENV = "LOTTERY_CHANNELS_LAST"
#: steps between two reads of the deferred loss check (Trainer.defer_loss_check)
LOSS_CHECK_EVERY = 100


def use_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Whether to train ``model`` with its 4-d weights (and so its activations) in ``channels_last``.

    On the CPU oneDNN's convolution kernels, above all the backward ones, are faster in NHWC layout for the
    narrow networks this project trains: ResNet-20 at width 0.25 1.5x per step, Conv-4 at width 0.125
    1.25x (benchmarks/RESULTS.md, "Speed of the training loop"). The values computed are the same up to
    the order of additions inside a convolution (rounding). Default (``auto``): on the CPU for models with
    a 2-d convolution; ``LOTTERY_CHANNELS_LAST=0`` turns it off (e.g. to reproduce runs made before it),
    ``=1`` on for any device."""
    setting = os.environ.get(CHANNELS_LAST_ENV, "auto").strip().lower()
    if setting not in ("auto", "0", "1"):
        raise ConfigError(f"{CHANNELS_LAST_ENV}={setting!r}: use auto, 0 or 1")
    if setting == "0" or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return False
    return setting == "1" or device.type == "cpu"


def _default_log(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg)
