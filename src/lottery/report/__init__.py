"""Tables and plots of results: what a user would otherwise draw by hand after every run.

Two levels. For one run: :func:`print_table` and :func:`plot_run_summary` (what ``lottery search cs``
prints). For many runs (``lottery report RUN_DIRS...``): :func:`write_report` gathers every
``results.json`` at or below the given folders, groups the runs that differ only in their seed
(:func:`summarize`), decides which tickets match the dense network (docs/methods.md: mean test accuracy
at most 0.2 percentage points below the dense mean of the same model, data and recipe), and writes a
table (CSV and Markdown), accuracy-against-density plots, the per-layer density of one ticket and the
training cost of finding K tickets with CS against IMP (PNG and SVG).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from lottery.report.plots import (  # noqa: F401  (the public names of lottery.report)
    _mpl, _save, mask_report_path, plot_accuracy_vs_density, plot_epochs_vs_tickets, plot_layer_density,
    plot_run_summary,
)
from lottery.report.summary import (  # noqa: F401
    _SWEPT_ALWAYS, _SWEPT_BY_METHOD, DISTINGUISHING, MATCH_TOLERANCE, _setting, collect_results,
    epochs_for_tickets, epochs_for_tickets_by_data, find_results, method_label, sparsest_matching, summarize,
)
from lottery.report.tables import (  # noqa: F401
    CSV_COLUMNS, CSV_FIELDS, DEFAULT_COLUMNS, FOOTNOTE, REPORT_COLUMNS, _display_rows, _pm, format_table,
    human_count, print_table, rows_to_csv,
)


@dataclass
class Report:
    rows: list[dict[str, Any]]
    sparsest: list[dict[str, Any]]
    files: list[Path] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)

    def text(self, markdown: bool = False) -> str:
        """The table and the sparsest matching tickets, for the terminal (or Markdown)."""
        out = [format_table(_display_rows(self.rows), REPORT_COLUMNS, markdown=markdown), "",
               f"_{FOOTNOTE}_" if markdown else FOOTNOTE]
        head = "## Sparsest matching ticket per method" if markdown else "sparsest matching ticket per method:"
        out += ["", head]
        if not self.sparsest:
            out.append("(none matches: every one is more than 0.2 percentage points below its dense network)")
        for r in self.sparsest:
            seeds = f"{r['n_seeds']} seed{'s' if r['n_seeds'] != 1 else ''}"
            out.append(f"{'- ' if markdown else '  '}{r['method']} {r['model']}/{r['dataset']}: density "
                       f"{r['density']:.4f} ({r['setting'] or 'no hparams'}), test acc {_pm(r['test_accuracy'], r['test_accuracy_std'])}"
                       f" vs dense {_pm(r['dense_test_accuracy'], r['dense_test_accuracy_std'])}, {seeds}"
                       f" ({r['run_dirs'][0]})")
        return "\n".join(out)


def _slug(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(str(p) for p in parts if p is not None)).strip("-")


def _swept(row: dict[str, Any]) -> set[str]:
    """The settings of a row that move it along the density axis rather than onto another curve."""
    keys = set(_SWEPT_ALWAYS) | set(_SWEPT_BY_METHOD.get(row["method"].split()[0], ()))
    if "level" in row["params"]:
        keys.add("level")
    return keys


def _series_names(points: Sequence[dict[str, Any]]) -> list[str]:
    """One curve per method label and distinguishing settings other than the swept ones (:func:`_swept`);
    named by the method and the settings that differ between the curves of that method."""
    keys = []
    for p in points:
        swept = _swept(p)
        keys.append({k: v for k, v in p["params"].items() if k not in swept and k.rsplit(".", 1)[-1] not in swept})
    names = []
    for p, own in zip(points, keys):
        siblings = [k for q, k in zip(points, keys) if q["method"] == p["method"]]
        differ = {k: v for k, v in own.items() if len({json.dumps(s.get(k), default=str) for s in siblings}) > 1}
        names.append(p["method"] + (f" ({_setting(differ)})" if differ else ""))
    return names


def _dense_band(mine: Sequence[dict[str, Any]]) -> tuple[float | None, float | None]:
    """The dense accuracy (mean, std) to draw for one model and data set: its one dense group, else the
    reference that most of its tickets compare with."""
    dense = [r for r in mine if r["method"] == "dense"]
    if len(dense) == 1:
        return dense[0]["test_accuracy"], dense[0]["test_accuracy_std"]
    refs = [(r["dense_test_accuracy"], r["dense_test_accuracy_std"]) for r in mine
            if r["method"] != "dense" and r.get("dense_test_accuracy") is not None]
    if not refs:
        return (dense[0]["test_accuracy"], dense[0]["test_accuracy_std"]) if dense else (None, None)
    return max(set(refs), key=lambda ref: (refs.count(ref), -refs.index(ref)))


def write_report(paths: Iterable[str | Path], out: str | Path, layers: str | Path | None = None,
                 tolerance: float = MATCH_TOLERANCE) -> Report:
    """Gather, summarise and draw the runs at or below ``paths``; write everything into ``out``.

    Files: ``report.csv``, ``report.md``, ``accuracy_vs_density_<model>_<dataset>.png/.svg`` (one per
    model and data set, one curve per method and settings; points of density 0 cannot sit on the log axis
    and are left out), ``epochs_vs_tickets.png/.svg`` (one panel per model and data set) and
    ``layer_density_<run>.png/.svg`` for the ticket in ``layers`` (default: the first sparsest matching
    ticket that has a mask.json).
    """
    paths = [Path(p) for p in paths]
    if layers is not None and not Path(layers).exists():
        from lottery.errors import ConfigError

        raise ConfigError(f"{layers} does not exist")
    records = find_results(paths)
    if not records:
        from lottery.errors import ConfigError

        raise ConfigError(f"no results.json with test_accuracy and density at or below {', '.join(map(str, paths))}")
    rows = summarize(records, tolerance)
    sparsest = sparsest_matching(rows)
    report = Report(rows, sparsest, records=records)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from lottery.io import atomic_write_bytes

    atomic_write_bytes(out / "report.csv", rows_to_csv(rows).encode())
    atomic_write_bytes(out / "report.md", ("# lottery report\n\n" + report.text(markdown=True) + "\n").encode())
    report.files += [out / "report.csv", out / "report.md"]

    for model, dataset in sorted({(r["model"], r["dataset"]) for r in rows}, key=lambda k: tuple(map(str, k))):
        mine = [r for r in rows if (r["model"], r["dataset"]) == (model, dataset)]
        points = [r for r in mine if r["method"] != "dense" and r["density"] and r["test_accuracy"] is not None]
        points = [{**p, "series": name} for p, name in zip(points, _series_names(points))]
        path = out / f"accuracy_vs_density_{_slug(model, dataset)}.png"
        dense_acc, dense_std = _dense_band(mine)
        plot_accuracy_vs_density(points, path, dense_accuracy=dense_acc, dense_std=dense_std,
                                 title=f"{model} on {dataset}")
        report.files += [path, path.with_suffix(".svg")]
        if any(p.get("flops_sparse") for p in points):
            path = out / f"accuracy_vs_flops_{_slug(model, dataset)}.png"
            plot_accuracy_vs_density(points, path, dense_accuracy=dense_acc, dense_std=dense_std,
                                     title=f"{model} on {dataset}", x="flops")
            report.files += [path, path.with_suffix(".svg")]

    report.files += plot_epochs_vs_tickets(epochs_for_tickets_by_data(rows), out / "epochs_vs_tickets.png")

    chosen = layers
    if chosen is None:
        for r in sparsest:
            for d in r["run_dirs"]:
                if d and (Path(d) / "mask.json").is_file():
                    chosen = d
                    break
            if chosen is not None:
                break
    if chosen is not None:
        report.files += plot_layer_density(chosen, out / f"layer_density_{_slug(Path(chosen).name)}.png")
    return report
