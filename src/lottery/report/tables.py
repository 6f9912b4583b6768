"""The report's tables: fixed-width and Markdown tables, the summary table's columns, CSV."""

from __future__ import annotations

import csv
import io
from typing import Any, Sequence


DEFAULT_COLUMNS = (
    ("method", "method", "{}"),
    ("model", "model", "{}"),
    ("dataset", "dataset", "{}"),
    ("seed", "seed", "{}"),
    ("density", "density", "{:.4g}"),
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


def human_count(v: float) -> str:
    """1234567 -> '1.23M': FLOP and parameter counts for tables and axis labels."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:g}"


def _mask_cell(row: dict[str, Any]) -> str:
    if row.get("mask_converged") is None:
        return "-"
    detail = f"{100 * row['mask_undecided_max']:.2f} % undecided, gap {100 * row['mask_gap_max']:.2f}"
    return ("yes" if row["mask_converged"] else "NO") + f" ({detail})"


def _pm(mean: float | None, std: float | None) -> str:
    """``mean ± std`` in percent; the std is ``–`` where there is none (a single seed)."""
    if mean is None:
        return "-"
    return f"{100 * mean:.2f} ± " + ("–" if std is None else f"{100 * std:.2f}")


REPORT_COLUMNS = (
    ("method", "method", "{}"),
    ("model", "model", "{}"),
    ("dataset", "dataset", "{}"),
    ("setting", "setting", "{}"),
    ("density", "density", "{:.4g}"),
    ("flops", "FLOPs/example", "{}"),
    ("theoretical_speedup", "speed-up (FLOPs)", "{:.2f}x"),
    ("acc", "test acc % (mean ± std, n-1)", "{}"),
    ("n_seeds", "seeds", "{}"),
    ("dense", "dense acc %", "{}"),
    ("match", "matches dense", "{}"),
    ("mask", "mask binary (worst round)", "{}"),
    ("epochs", "epochs/run", "{:.1f}"),
    ("wall_seconds", "wall s/run", "{:.1f}"),
)


FOOTNOTE = ("± std: sample standard deviation over seeds (n - 1), – with a single seed. epochs/run, wall s/run: "
            "mean per seed of everything spent to obtain that network; for a level of an iterative run (IMP) "
            "both are cumulative, from the dense level 0 up to and including that level. mask binary (CS): whether "
            "every search round of every seed ended with at most 1 % of logits undecided (|beta*s| < ln 99) and "
            "hard-mask val accuracy within 0.3 points of the soft network's; worst undecided %, worst gap in points. "
            "FLOPs/example: multiply-accumulates of the kept Conv and Linear weights per example (biases, "
            "normalisation, activations and pooling not counted); speed-up (FLOPs): dense FLOPs / these, a count, "
            "not a timing.")


def _display_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "acc": _pm(r["test_accuracy"], r["test_accuracy_std"]),
             "dense": _pm(r["dense_test_accuracy"], r["dense_test_accuracy_std"]),
             "match": {True: "yes", False: "no", None: "-"}[r["matching"]],
             **({"flops": human_count(r["flops_sparse"])} if r.get("flops_sparse") is not None else {}),
             **({"mask": _mask_cell(r)} if r.get("mask_converged") is not None else {}),
             "setting": r["setting"] or "-"} for r in rows]


# CSV columns: (name in the file, key of the summary row). The stds are sample standard deviations over
# seeds (n - 1), empty for a single seed; the header says so, as there is no footnote in a CSV.
CSV_COLUMNS = (("method", "method"), ("model", "model"), ("dataset", "dataset"), ("setting", "setting"),
               ("n_seeds", "n_seeds"), ("seeds", "seeds"), ("density", "density"),
               ("density_std_n-1", "density_std"), ("test_accuracy", "test_accuracy"),
               ("test_accuracy_std_n-1", "test_accuracy_std"), ("dense_test_accuracy", "dense_test_accuracy"),
               ("dense_test_accuracy_std_n-1", "dense_test_accuracy_std"), ("matching", "matching"),
               ("mask_converged", "mask_converged"), ("mask_undecided_max", "mask_undecided_max"),
               ("mask_soft_hard_gap_max", "mask_gap_max"),
               ("params_nonzero", "params_nonzero"), ("flops_dense", "flops_dense"), ("flops_sparse", "flops_sparse"),
               ("theoretical_speedup", "theoretical_speedup"),
               ("epochs", "epochs"), ("wall_seconds_cumulative", "wall_seconds"), ("recipe", "recipe"),
               ("run_dirs", "run_dirs"))


CSV_FIELDS = tuple(name for name, _ in CSV_COLUMNS)


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The summary rows as CSV (accuracies and densities as fractions, as in results.json)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_FIELDS)
    for r in rows:
        out = {**r, "seeds": " ".join(map(str, r["seeds"])), "run_dirs": ";".join(map(str, r["run_dirs"])),
               "matching": "" if r["matching"] is None else str(r["matching"]).lower(),
               "mask_converged": "" if r.get("mask_converged") is None else str(r["mask_converged"]).lower()}
        w.writerow(["" if out.get(key) is None else out[key] for _, key in CSV_COLUMNS])
    return buf.getvalue()
