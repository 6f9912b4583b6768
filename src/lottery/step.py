"""Training time as a ``Step``: written ``'20ep'``, ``'500it'`` or ``'1ep50it'``, counted in iterations.

Rewind points and LR milestones are given in epochs or iterations; comparing them needs the number
of iterations per epoch, which only the data loader knows. So a step spec stays a string in the
hparams (hashable, printable) and becomes a ``Step`` once the loader exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lottery.errors import ConfigError

_STEP_RE = re.compile(r"^\s*(?:(\d+)\s*ep)?\s*(?:(\d+)\s*it)?\s*$")


def parse_step_spec(spec: str | int) -> tuple[int, int]:
    """Split ``'1ep50it'`` into ``(epochs, iterations)``; raise ConfigError on anything else."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 0:
            raise ConfigError(f"a step cannot be negative, got {spec}")
        return 0, spec
    if not isinstance(spec, str):
        raise ConfigError(f"a step must be written like '20ep', '500it' or '1ep50it', got {spec!r}")
    m = _STEP_RE.match(spec)
    if not m or (m.group(1) is None and m.group(2) is None):
        raise ConfigError(f"a step must be written like '20ep', '500it' or '1ep50it', got {spec!r}")
    return int(m.group(1) or 0), int(m.group(2) or 0)


def validate_step_spec(spec: str, field: str) -> None:
    try:
        parse_step_spec(spec)
    except ConfigError as e:
        raise ConfigError(f"{field}: {e}") from None


@dataclass(frozen=True, order=True)
class Step:
    """A point in training, stored as an absolute iteration count."""

    iteration: int
    iterations_per_epoch: int

    def __post_init__(self) -> None:
        if self.iterations_per_epoch <= 0:
            raise ConfigError(f"iterations per epoch must be positive, got {self.iterations_per_epoch}")
        if self.iteration < 0:
            raise ConfigError(f"a step cannot be negative, got {self.iteration}")

    @classmethod
    def parse(cls, spec: str | int, iterations_per_epoch: int) -> "Step":
        ep, it = parse_step_spec(spec)
        return cls(ep * iterations_per_epoch + it, iterations_per_epoch)

    @classmethod
    def zero(cls, iterations_per_epoch: int) -> "Step":
        return cls(0, iterations_per_epoch)

    @property
    def ep(self) -> int:
        """Completed epochs."""
        return self.iteration // self.iterations_per_epoch

    @property
    def it(self) -> int:
        """Iterations into the current epoch."""
        return self.iteration % self.iterations_per_epoch

    @property
    def epochs(self) -> float:
        """Fractional epochs, for accounting the training spent."""
        return self.iteration / self.iterations_per_epoch

    def __str__(self) -> str:
        if self.it == 0:
            return f"{self.ep}ep"
        return f"{self.ep}ep{self.it}it" if self.ep else f"{self.it}it"
