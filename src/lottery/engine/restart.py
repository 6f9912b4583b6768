"""Starting an optimizer and its LR schedule afresh inside a user's own training loop.

Why: ``lottery search cs`` builds new optimizers and a new LR schedule for every search round, and a
ticket is retrained with a fresh optimizer. A user's own loop keeps one optimizer and one scheduler;
these two functions put them back where they were when they were built, without rebuilding them (a
rebuilt ``MultiStepLR`` would start from the *current*, decayed learning rate)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import lr_scheduler

from lottery.errors import ConfigError


def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor] | None = None) -> int:
    """Forget the optimizer's per-parameter state (SGD's momentum buffers, Adam's moments and step
    counts) for ``params`` (default: every parameter it optimizes), so that its next step is the step of
    a freshly built optimizer. Parameter groups, learning rates and weight decay are kept. Returns the
    number of parameters whose state was dropped."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"reset_optimizer_state takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if params is None:
        targets = [p for group in optimizer.param_groups for p in group["params"]]
    else:
        targets = list(params)
    dropped = 0
    for p in targets:
        if optimizer.state.pop(p, None) is not None:
            dropped += 1
    return dropped


_COMPOSITE = (lr_scheduler.SequentialLR, lr_scheduler.ChainedScheduler, lr_scheduler.ReduceLROnPlateau)


def restart_lr_schedule(scheduler: lr_scheduler.LRScheduler) -> None:
    """Rewind a torch LR scheduler to where it was right after it was built: every parameter group's
    learning rate back to its starting value (``initial_lr``) and the scheduler at its first step, so
    that the following epochs (or steps) see the same learning rates as the first ones did.

    Call it where a new schedule should begin, after the last ``scheduler.step()`` of the old one (with
    ``ContinuousSparsification``: call ``scheduler.step()`` before ``cs.epoch_end()`` and restart in
    ``on_round_start``). Works for the schedulers that compute the rate from their step count
    (``MultiStepLR``, ``StepLR``, ``CosineAnnealingLR``, ``LambdaLR``, ``OneCycleLR``, ...); for
    ``SequentialLR``, ``ChainedScheduler`` and ``ReduceLROnPlateau`` it raises: build a new one of those
    after resetting the learning rates yourself."""
    if isinstance(scheduler, _COMPOSITE):
        raise ConfigError(f"restart_lr_schedule cannot rewind a {type(scheduler).__name__}: set each param group's "
                          "'lr' back to its 'initial_lr' and build a new scheduler")
    if not isinstance(scheduler, lr_scheduler.LRScheduler):
        raise ConfigError(f"restart_lr_schedule needs a torch LR scheduler, got {type(scheduler).__name__}")
    groups = scheduler.optimizer.param_groups
    if len(groups) != len(scheduler.base_lrs):
        raise ConfigError(
            f"the optimizer has {len(groups)} parameter groups but its LR scheduler was built for "
            f"{len(scheduler.base_lrs)}: a group was added or removed after the scheduler was built (e.g. "
            "ContinuousSparsification(mask_optimizer='sgd') adds one for the mask logits, finish() removes it); "
            "build the scheduler after the groups change"
        )
    for group, lr in zip(groups, scheduler.base_lrs):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(float(lr))
        else:
            group["lr"] = lr.clone() if isinstance(lr, torch.Tensor) else lr
    scheduler.last_epoch = -1
    initial_step = getattr(scheduler, "_initial_step", None)  # what the constructor does last
    if initial_step is not None:
        initial_step()  # one step to epoch 0, without the step-order warning
    else:
        scheduler.step()
