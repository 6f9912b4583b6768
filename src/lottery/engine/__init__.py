"""The training engine: steps, LR schedules, one training loop with callbacks, evaluation, checkpoints."""

from lottery.engine.callbacks import Callback
from lottery.engine.checkpoint import load_checkpoint, save_checkpoint
from lottery.engine.evaluate import evaluate
from lottery.engine.restart import reset_optimizer_state, restart_lr_schedule
from lottery.engine.schedule import LRSchedule
from lottery.step import Step, parse_step_spec
from lottery.engine.trainer import Trainer, make_optimizer

__all__ = [
    "Callback",
    "LRSchedule",
    "Step",
    "Trainer",
    "evaluate",
    "load_checkpoint",
    "make_optimizer",
    "parse_step_spec",
    "reset_optimizer_state",
    "restart_lr_schedule",
    "save_checkpoint",
]
