"""What `lottery search imp` prints after its per-level table: the matching rule in words that stay true
when a pruned level is more accurate than the dense network (it often is at mild sparsity)."""

from lottery.cli.imp import _print_levels
from lottery.report import Report


def test_a_level_above_dense_is_not_called_within_0_2_points(capsys):
    results = {"run_dir": "runs/x", "sparsest_matching": {"level": 2, "density": 0.64, "test_accuracy": 0.8549},
               "levels": [{"level": 0, "test_accuracy": 0.8496}, {"level": 2, "test_accuracy": 0.8549}]}
    _print_levels(results, "IMP (rewind 1ep): tickets per level")
    out = capsys.readouterr().out
    assert ("sparsest matching level: 2 (density 0.6400, test 85.49% against dense 84.96%; one seed; "
            "matching: at most 0.2 points below dense)") in out
    assert "within" not in out


def test_no_matching_level_says_every_level_is_more_than_0_2_points_below(capsys):
    _print_levels({"run_dir": "runs/x", "sparsest_matching": None, "levels": [{"level": 0, "test_accuracy": 0.9}]}, "IMP")
    assert "no level matches: every one is more than 0.2 points below the dense network (90.00%)" in capsys.readouterr().out
    _print_levels({"run_dir": "runs/x", "sparsest_matching": None, "levels": []}, "IMP")
    assert "no matching level: the dense network's accuracy (level 0) is not known" in capsys.readouterr().out


def test_a_report_without_a_matching_ticket_says_why():
    text = Report(rows=[], sparsest=[]).text()
    assert "(none matches: every one is more than 0.2 percentage points below its dense network)" in text
