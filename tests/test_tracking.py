"""lottery.tracking: TensorBoard events and the run plot, both drawn from metrics.csv."""

from __future__ import annotations

from pathlib import Path

import pytest

from lottery import cli
from lottery.errors import ConfigError
from lottery.experiment import RunOptions, write_metrics_csv
from lottery.tracking import plot_run, read_metrics, write_tensorboard

ROWS = [
    {"stage": "round_0", "step": 10, "epoch": 1.0, "val_accuracy": 0.5, "test_accuracy": 0.45, "density": 0.8, "beta": 2.0},
    {"stage": "round_0", "step": 20, "epoch": 2.0, "val_accuracy": 0.6, "test_accuracy": 0.55, "density": 0.5, "beta": 200.0,
     "undecided": ""},
    {"stage": "ticket", "step": 20, "epoch": 2.0, "val_accuracy": 0.7, "test_accuracy": 0.66, "density": 0.5, "beta": ""},
]


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_exactly_the_rows_of_metrics_csv(tmp_path):
    pytest.importorskip("tensorboard")
    write_metrics_csv(tmp_path / "metrics.csv", ROWS)
    folder = write_tensorboard(tmp_path, read_metrics(tmp_path))
    scalars = _scalars(folder)
    assert scalars["round_0/val_accuracy"] == [(10, 0.5), (20, pytest.approx(0.6))]
    assert scalars["ticket/test_accuracy"] == [(20, pytest.approx(0.66))]
    assert "ticket/beta" not in scalars and "round_0/undecided" not in scalars  # empty cells are not points
    # rebuilt, not appended: writing again (a resumed run) leaves one point per row
    write_tensorboard(tmp_path, read_metrics(tmp_path))
    assert _scalars(folder)["round_0/val_accuracy"] == [(10, 0.5), (20, pytest.approx(0.6))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "tensorboard"]  # no temporary left


def test_a_run_with_tensorboard_writes_events_beside_metrics_csv(tmp_path):
    pytest.importorskip("tensorboard")
    code = cli.main(["train", "--dataset", "synthetic", "--synthetic-shape", "1,8,8", "--synthetic-train-size", "96",
                     "--synthetic-test-size", "32", "--val-size", "32", "--training-steps", "2ep", "--batch-size", "32",
                     "--out", str(tmp_path), "--no-progress", "--tensorboard"])
    assert code == 0
    (folder,) = tmp_path.glob("train_*")
    scalars = _scalars(folder / "tensorboard")
    rows = read_metrics(folder)
    assert [v for _, v in scalars["train/test_accuracy"]] == pytest.approx([float(r["test_accuracy"]) for r in rows])


def test_tensorboard_without_the_package_is_a_one_line_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError) as e:
        RunOptions(tensorboard=True)
    assert "lottery[tensorboard]" in str(e.value) and "\n" not in str(e.value)


def test_plot_run_draws_each_panel_from_metrics_csv(tmp_path, capsys):
    write_metrics_csv(tmp_path / "metrics.csv", ROWS)
    files = plot_run(tmp_path)
    assert [f.name for f in files] == ["run_curves.png", "run_curves.svg"] and all(f.stat().st_size > 0 for f in files)
    svg = files[1].read_text()
    assert "density (% kept)" in svg and "temperature beta" in svg and "round_0 val" in svg
    assert cli.main(["plot-run", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").is_file()
    with pytest.raises(ConfigError):
        plot_run(tmp_path / "nothing")
