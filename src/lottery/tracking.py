"""A run's curves over training: TensorBoard event files and a plot, both drawn from metrics.csv.

metrics.csv stays the record (atomic, resumable, readable without any tool). TensorBoard is a view of
it: with ``--tensorboard`` the run's ``tensorboard/`` folder is rebuilt from all of metrics.csv's rows
whenever metrics.csv is written (once per epoch), so a resumed run never holds a point twice and a
killed one never holds a point that metrics.csv lacks. Each row's numeric columns become the scalars
``<stage>/<column>`` (``round_0/val_accuracy``, ``ticket/test_accuracy``) at the row's iteration.
``lottery plot-run RUN_DIR`` draws accuracy, density and temperature against epochs.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from lottery.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
_NOT_SCALARS = ("stage", "step", "epoch")


def require_tensorboard() -> None:
    """Fail in one line, before a run starts, when ``--tensorboard`` cannot work."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'lottery[tensorboard]' "
                          "(or drop --tensorboard: metrics.csv has the same numbers)") from None


def _number(value: Any) -> float | None:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def write_tensorboard(run_dir: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """(Re)write ``run_dir/tensorboard`` from ``rows`` (metrics.csv's rows). Returns that folder."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(run_dir)
    final = run_dir / TENSORBOARD_DIR
    tmp = run_dir / f".{TENSORBOARD_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    writer = SummaryWriter(log_dir=str(tmp))
    try:
        for row in rows:
            step = _number(row.get("step"))
            if step is None:
                continue
            stage = str(row.get("stage") or "train")
            for key, value in row.items():
                x = _number(value)
                if key not in _NOT_SCALARS and x is not None:
                    writer.add_scalar(f"{stage}/{key}", x, int(step))
    finally:
        writer.close()
    old = run_dir / f".{TENSORBOARD_DIR}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: give a run folder (one that holds metrics.csv)")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_run(run_dir: Path, path: Path | None = None) -> list[Path]:
    """Accuracy (val, test), density and temperature (where recorded) against epochs, one line per stage
    (a CS round, the ticket's retraining, an IMP level). Saved as PNG and SVG; returns the files."""
    from lottery.io import save_figure
    from lottery.report.plots import _mpl

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise ConfigError(f"{run_dir / 'metrics.csv'} has no rows yet: nothing to plot")
    stages: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        stages.setdefault(row.get("stage") or "train", []).append(row)
    panels = [("accuracy (%)", ("val_accuracy", "test_accuracy"), 100.0)]
    if any(_number(r.get("density")) is not None for r in rows):
        panels.append(("density (% kept)", ("density",), 100.0))
    if any(_number(r.get("beta")) is not None for r in rows):
        panels.append(("temperature beta (log)", ("beta",), 1.0))
    plt = _mpl()
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels) + 0.6), sharex=False,
                             layout="constrained", squeeze=False)
    for ax, (label, keys, factor) in zip(axes[:, 0], panels):
        for i, (stage, srows) in enumerate(stages.items()):
            for key in keys:
                pts = [(_number(r.get("epoch")), _number(r.get(key))) for r in srows]
                pts = [(e, factor * v) for e, v in pts if e is not None and v is not None]
                if pts:  # one colour per stage; validation solid, test dashed
                    style = "-" if key != "test_accuracy" else "--"
                    name = stage if len(keys) == 1 else f"{stage} {key.split('_')[0]}"
                    ax.plot(*zip(*pts), style, color=f"C{i % 10}", marker="o", markersize=3, label=name)
        if label.startswith("temperature"):
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_xlabel("epoch (within its stage)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0] and len(ax.get_legend_handles_labels()[0]) <= 12:
            ax.legend(fontsize=7)
    axes[0, 0].set_title(f"run {run_dir.name}", fontsize=9)
    path = Path(path) if path is not None else run_dir / "run_curves.png"
    save_figure(fig, path, dpi=120, bbox_inches="tight")
    save_figure(fig, path.with_suffix(".svg"), bbox_inches="tight")
    plt.close(fig)
    return [path, path.with_suffix(".svg")]
