"""Learning-rate schedules as pure functions of the absolute iteration.

A pure function (rather than a stateful torch LR scheduler) is what makes rewinding simple: a ticket
retrained from step k just asks for the multiplier at k, k+1, ... and gets the same values the dense
run had there, and a resumed run needs no scheduler state in its checkpoint.
"""

from __future__ import annotations

import math

from lottery.step import Step
from lottery.hparams import TrainingHparams


class LRSchedule:
    """Multiplier of the base learning rate at a given iteration of a ``TrainingHparams`` recipe."""

    def __init__(self, hp: TrainingHparams, iterations_per_epoch: int):
        self.kind = hp.schedule
        self.total = Step.parse(hp.training_steps, iterations_per_epoch).iteration
        self.warmup = Step.parse(hp.warmup_steps, iterations_per_epoch).iteration
        self.milestones = sorted(Step.parse(m, iterations_per_epoch).iteration for m in hp.milestones)
        self.gamma = hp.gamma

    def __call__(self, iteration: int) -> float:
        if self.kind == "constant":
            mult = 1.0
        elif self.kind == "multistep":
            passed = sum(1 for m in self.milestones if iteration >= m)
            mult = self.gamma**passed
        else:  # cosine from 1 to 0 over the whole run (after warm-up)
            span = max(1, self.total - self.warmup)
            progress = min(1.0, max(0.0, (iteration - self.warmup) / span))
            mult = 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.warmup > 0 and iteration < self.warmup:
            # Linear warm-up reaches the full rate at the end of the warm-up; iteration 0 is not
            # 0 (a wasted step) but 1/warmup.
            mult *= (iteration + 1) / self.warmup
        return mult
