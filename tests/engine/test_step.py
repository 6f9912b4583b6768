import pytest

from lottery.errors import ConfigError
from lottery.step import Step, parse_step_spec


@pytest.mark.parametrize(
    "spec,expected",
    [("20ep", (20, 0)), ("500it", (0, 500)), ("1ep50it", (1, 50)), ("0ep", (0, 0)), (" 3ep ", (3, 0)), (7, (0, 7))],
)
def test_parse(spec, expected):
    assert parse_step_spec(spec) == expected


@pytest.mark.parametrize("bad", ["", "ep", "-1ep", "3", "2.5ep", "10it2ep", "abc", None, -3, 1.5])
def test_parse_rejects(bad):
    with pytest.raises(ConfigError):
        parse_step_spec(bad)


def test_step_arithmetic():
    s = Step.parse("2ep30it", 100)
    assert s.iteration == 230 and s.ep == 2 and s.it == 30
    assert s.epochs == pytest.approx(2.3)
    assert str(s) == "2ep30it"
    assert str(Step.parse("500it", 1000)) == "500it"
    assert str(Step.parse("3ep", 10)) == "3ep"
    assert Step.parse("1ep", 10) < Step.parse("11it", 10)


def test_step_needs_positive_epoch_length():
    with pytest.raises(ConfigError):
        Step(0, 0)
