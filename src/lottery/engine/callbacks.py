"""Hooks through which methods (CS, IMP, ...) change training without copying the loop.

A method that needs a penalty term, a per-step mask enforcement, a temperature per epoch or a
snapshot at the rewind point writes a small ``Callback``; the engine never learns which method runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from lottery.engine.trainer import Trainer


class Callback:
    """Override what you need. ``state_dict`` must be JSON-able: it is stored in checkpoints."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        """Before the first step of this fit (also after a resume)."""

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        """Before the first batch of ``epoch`` (0-based), also when starting mid-epoch."""

    def on_step_start(self, trainer: "Trainer") -> None:
        """Before the forward pass of the step ``trainer.iteration``."""

    def extra_loss(self, trainer: "Trainer") -> torch.Tensor | None:
        """A term added to the task loss (e.g. the CS mask penalty); None for nothing."""
        return None

    def on_step_end(self, trainer: "Trainer") -> None:
        """After the optimizer step; ``trainer.iteration`` already counts this step."""

    def on_evaluate(self, trainer: "Trainer", row: dict[str, Any]) -> None:
        """Add entries to a metrics row before it is recorded."""

    def on_epoch_end(self, trainer: "Trainer", epoch: int) -> None:
        """After the last batch of ``epoch`` and its evaluation, before the checkpoint."""

    def on_fit_end(self, trainer: "Trainer") -> None:
        """After the last step."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
