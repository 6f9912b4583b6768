"""Tables and plots of results: what a user would otherwise draw by hand after every run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

DEFAULT_COLUMNS = (
    ("method", "method", "{}"),
    ("model", "model", "{}"),
    ("dataset", "dataset", "{}"),
    ("seed", "seed", "{}"),
    ("density", "density", "{:.4f}"),
    ("test_accuracy", "test acc %", "pct"),
    ("dense_test_accuracy", "dense acc %", "pct"),
    ("epochs", "epochs", "{:.1f}"),
    ("wall_seconds", "wall s", "{:.1f}"),
)


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "pct":
        return f"{100 * float(value):.2f}"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns=DEFAULT_COLUMNS, markdown: bool = False) -> str:
    """A fixed-width (or Markdown) table of the columns that at least one row has."""
    cols = [c for c in columns if any(c[0] in r for r in rows)]
    header = [c[1] for c in cols]
    body = [[_fmt(r.get(key), fmt) for key, _, fmt in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
    def line(cells):
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    out = [line(header), line(["-" * w for w in widths])] + [line(row) for row in body]
    return "\n".join(out)


def print_table(rows: Sequence[dict[str, Any]], title: str | None = None, columns=DEFAULT_COLUMNS) -> None:
    if title:
        print(f"\n{title}")
    print(format_table(rows, columns))


def plot_accuracy_vs_density(
    points: Sequence[dict[str, Any]], path: Path, *, dense_accuracy: float | None = None, title: str = ""
) -> None:
    """Test accuracy against density (log axis), one series per ``method``; saved as PNG (and SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    methods: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        methods.setdefault(p.get("method", "?"), []).append(p)
    for method, pts in methods.items():
        pts = sorted(pts, key=lambda p: p["density"])
        xs = [100 * p["density"] for p in pts]
        ys = [100 * p["test_accuracy"] for p in pts]
        errs = [100 * p.get("test_accuracy_std", 0.0) for p in pts]
        ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", capsize=3, label=method)
    if dense_accuracy is not None:
        ax.axhline(100 * dense_accuracy, color="gray", linestyle="--", label="dense")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("density (% of prunable weights kept, log scale)")
    ax.set_ylabel("test accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    fig.savefig(path.with_suffix(".svg"))
    plt.close(fig)


def collect_results(out: Path, model: str | None = None, dataset: str | None = None) -> list[dict[str, Any]]:
    """Every ``results.json`` directly below ``out`` (one per run folder), optionally filtered."""
    from lottery.io import read_json

    found = []
    for path in sorted(Path(out).glob("*/results.json")):
        try:
            r = read_json(path)
        except (OSError, ValueError):
            continue
        if model and r.get("model") != model or dataset and r.get("dataset") != dataset:
            continue
        found.append(r)
    return found


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
