"""The report's plots: accuracy against density or FLOPs, epochs against tickets, per-layer density."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

from lottery.report.summary import _read_json, collect_results
from lottery.report.tables import human_count


def plot_accuracy_vs_density(
    points: Sequence[dict[str, Any]], path: Path, *, dense_accuracy: float | None = None, title: str = "",
    dense_std: float | None = None, x: str = "density",
) -> None:
    """Test accuracy against density (``x="density"``) or against the network's multiply-accumulates per
    example (``x="flops"``, results.json's ``flops_sparse``), log axis, one series per ``series``
    (default: ``method``); saved as PNG (and SVG). Points without the x value are left out.

    A point's ``test_accuracy_std`` becomes its error bar (none where it is None: a single seed);
    ``dense_std`` draws the dense accuracy as a band (mean +- std) around its line.
    """
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    series: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        series.setdefault(p.get("series") or p.get("method", "?"), []).append(p)
    key, factor = ("density", 100.0) if x == "density" else ("flops_sparse", 1.0)
    all_x = [factor * p[key] for p in points if p.get(key)]
    for name, pts in series.items():
        pts = sorted((p for p in pts if p.get(key)), key=lambda p: p[key])
        if not pts:
            continue
        xs = [factor * p[key] for p in pts]
        ys = [100 * p["test_accuracy"] for p in pts]
        errs = [100 * (p.get("test_accuracy_std") or 0.0) for p in pts]
        ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", capsize=3, label=name)
    if dense_accuracy is not None:
        ax.axhline(100 * dense_accuracy, color="gray", linestyle="--",
                   label="dense" if not dense_std else "dense (mean ± std)")
        if dense_std:
            ax.axhspan(100 * (dense_accuracy - dense_std), 100 * (dense_accuracy + dense_std), color="gray", alpha=0.2)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("density (% of prunable weights kept, log scale)" if x == "density" else
                  "multiply-accumulates per example (Conv and Linear weights kept, log scale)")
    ax.set_ylabel("test accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    _label_log_ticks(fig, ax, all_x, (lambda v: f"{v:.3g}") if x == "density" else human_count)
    path = Path(path)
    from lottery.io import save_figure

    save_figure(fig, path, dpi=120, bbox_inches="tight")
    save_figure(fig, path.with_suffix(".svg"), bbox_inches="tight")
    plt.close(fig)


def _label_log_ticks(fig, ax, points: Sequence[float], fmt) -> None:
    """Label the log x axis at every point's value first, then at 1, 2 and 5 of each decade (every 1..9
    when the points span less than a decade) where room is left; a label that would overlap one already
    placed is left out (its tick stays), so labels never overlap. Draws the figure once to measure them."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    lo, hi = sorted(ax.get_xlim())
    values: list[float] = []
    for v in sorted(float(v) for v in points if lo <= v <= hi):
        if not values or fmt(v) != fmt(values[-1]):  # one tick per label text
            values.append(v)
    narrow = bool(values) and values[-1] / values[0] < 10
    subs = range(1, 10) if narrow else (1, 2, 5)
    texts = {fmt(v) for v in values}
    refs = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in subs]
    refs = [r for r in refs if lo <= r <= hi and fmt(r) not in texts]
    ticks = sorted(values + refs)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=tuple(float(i) for i in range(1, 10))))
    ax.xaxis.set_minor_formatter(NullFormatter())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    extent = {}
    for loc, tick in zip(ax.xaxis.get_majorticklocs(), ax.xaxis.get_major_ticks()):
        box = tick.label1.get_window_extent(renderer)
        extent[float(loc)] = (box.x0, box.x1)
    pad = 0.4 * ax.xaxis.get_major_ticks()[0].label1.get_fontsize() * fig.dpi / 72 if ticks else 0.0
    # The extreme points first (where the curves start and end), then the other points, then the references.
    order = ([values[0], values[-1]] if len(values) > 1 else values) + values[1:-1] + refs
    placed: list[tuple[float, float]] = []
    kept: list[float] = []
    for v in order:
        x0, x1 = extent.get(v, (None, None))
        if x0 is None:
            continue
        if all(x1 + pad <= a or b + pad <= x0 for a, b in placed):
            placed.append((x0, x1))
            kept.append(v)
    ax.xaxis.set_major_formatter(
        FuncFormatter(lambda v, _: fmt(v) if any(math.isclose(v, k, rel_tol=1e-9) for k in kept) else ""))


def plot_run_summary(out: Path, results: dict[str, Any]) -> Path:
    """Accuracy against density of every finished run of this model and data set below ``out``."""
    runs = collect_results(out, results.get("model"), results.get("dataset"))
    points = [r for r in runs if r.get("test_accuracy") is not None and r.get("density")]
    # Tickets and pruned networks are different curves, so the label carries the mode.
    labelled = [{**r, "method": f"{r['method']} {r.get('mode', '')}".strip()} for r in points if r.get("method") != "dense"]
    dense = [r["test_accuracy"] for r in points if r.get("method") == "dense"]
    dense_acc = sum(dense) / len(dense) if dense else results.get("dense_test_accuracy")
    path = Path(results["run_dir"]) / "accuracy_vs_density.png"
    plot_accuracy_vs_density(
        labelled, path, dense_accuracy=dense_acc,
        title=f"{results.get('model')} on {results.get('dataset')}",
    )
    return path


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> list[Path]:
    """PNG and SVG, cropped to what was drawn: titles, labels and outside legends are never cut off."""
    path = Path(path)
    from lottery.io import save_figure

    save_figure(fig, path.with_suffix(".png"), dpi=120, bbox_inches="tight")
    save_figure(fig, path.with_suffix(".svg"), bbox_inches="tight")
    _mpl().close(fig)
    return [path.with_suffix(".png"), path.with_suffix(".svg")]


def plot_epochs_vs_tickets(series: dict, path: Path, title: str = "") -> list[Path]:
    """Epochs spent against the number of tickets found, one line per method (formula: epochs_for_tickets).

    ``series``: ``{name: points}`` for one panel, or ``{(model, dataset): {name: points}}`` for one panel
    per model and data set (their epoch scales differ by orders of magnitude). Legends sit beside the
    panels, never over the curves.
    """
    panels = series if series and all(isinstance(k, tuple) for k in series) else {None: series}
    plt = _mpl()
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4), layout="constrained", squeeze=False)
    from matplotlib.ticker import MaxNLocator

    for ax, (key, lines) in zip(axes[0], panels.items()):
        for name, pts in lines.items():
            ax.plot([k for k, _ in pts], [e for _, e in pts], marker="o", label=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("number of tickets K")
        ax.set_ylabel("training epochs spent")
        ax.grid(True, alpha=0.3)
        if key is not None:
            ax.set_title(f"{key[0]} on {key[1]}")
        if lines:
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, borderaxespad=0.0)
    fig.suptitle(title or "cost of K tickets (CS: sum of K runs; IMP: levels up to K)")
    return _save(fig, path)


def mask_report_path(run_dir: str | Path) -> Path:
    """The ``mask.json`` of a ticket: the file itself, in the folder, or in its one subfolder that has one."""
    from lottery.errors import ConfigError

    p = Path(run_dir)
    if not p.exists():
        raise ConfigError(f"{p} does not exist")
    if p.is_file():
        return p
    if (p / "mask.json").is_file():
        return p / "mask.json"
    found = sorted(p.rglob("mask.json"))
    if len(found) == 1:
        return found[0]
    raise ConfigError(f"{p}: no single mask.json there (found {len(found)}); give the ticket's run folder")


def plot_layer_density(run_dir: str | Path, path: Path, title: str | None = None) -> list[Path]:
    """Bar chart of the kept fraction of each prunable layer of a ticket (from its mask.json) and, where
    mask.json has it, beside it each layer's share of the dense network's FLOPs: pruning a layer that
    holds most of the weights but little of the compute saves little time."""
    report = _read_json(mask_report_path(run_dir))
    layers = report.get("layers", {})
    names = list(layers)
    dens = [100 * float(layers[n]["density"]) for n in names]
    shares = [layers[n].get("flops_share") for n in names]
    with_flops = all(s is not None for s in shares) and bool(names)
    width = 0.4 if with_flops else 0.8
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 4.5), layout="constrained")
    offset = -width / 2 if with_flops else 0.0
    bars = ax.bar([i + offset for i in range(len(names))], dens, width=width, color="tab:blue",
                  label="density (% of the layer kept)")
    if with_flops:
        ax.bar([i + width / 2 for i in range(len(names))], [100 * float(s) for s in shares], width=width,
               color="tab:orange", label="share of the dense network's FLOPs (%)")
    for b, n in zip(bars, names):
        info = layers[n]
        ax.annotate(f"{info.get('kept', '?')}/{info.get('total', '?')}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=7)
    if report.get("density") is not None:
        ax.axhline(100 * float(report["density"]), color="tab:red", linestyle="--",
                   label=f"whole network {100 * float(report['density']):.2f}%")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("% (density; FLOPs share)" if with_flops else "density (% of the layer kept)")
    ax.set_ylim(0, 110)
    p = Path(run_dir)
    # A level folder alone (level_2) does not say whose level it is.
    name = f"{p.parent.name}/{p.name}" if re.fullmatch(r"level_\d+", p.name) else p.name
    ax.set_title(title or f"per-layer density: {name}", fontsize=9, wrap=True)
    return _save(fig, path)
