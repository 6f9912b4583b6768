import math

import pytest

from lottery.engine.schedule import LRSchedule
from lottery.hparams import TrainingHparams


def test_constant():
    s = LRSchedule(TrainingHparams(training_steps="10ep"), 10)
    assert [s(i) for i in (0, 50, 99)] == [1.0, 1.0, 1.0]


def test_multistep_break_points():
    hp = TrainingHparams(training_steps="160ep", schedule="multistep", milestones=("80ep", "120ep"), gamma=0.1)
    s = LRSchedule(hp, 10)
    assert s(799) == 1.0
    assert s(800) == pytest.approx(0.1)
    assert s(1199) == pytest.approx(0.1)
    assert s(1200) == pytest.approx(0.01)


def test_cosine_end_points():
    s = LRSchedule(TrainingHparams(training_steps="100it", schedule="cosine"), 10)
    assert s(0) == 1.0
    assert s(50) == pytest.approx(0.5)
    assert s(100) == pytest.approx(0.0, abs=1e-12)


def test_warmup_is_linear_then_full():
    hp = TrainingHparams(training_steps="10ep", warmup_steps="10it", schedule="multistep", milestones=("5ep",))
    s = LRSchedule(hp, 10)
    assert s(0) == pytest.approx(0.1)
    assert s(4) == pytest.approx(0.5)
    assert s(9) == pytest.approx(1.0)
    assert s(10) == 1.0
    assert s(50) == pytest.approx(0.1)


def test_rewound_schedule_equals_original():
    """The schedule is a pure function of the iteration: a ticket retrained from k sees the same LRs."""
    hp = TrainingHparams(training_steps="20ep", schedule="cosine", warmup_steps="1ep")
    a, b = LRSchedule(hp, 7), LRSchedule(hp, 7)
    assert all(math.isclose(a(i), b(i)) for i in range(0, 140))
