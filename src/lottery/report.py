"""Tables and plots of results: what a user would otherwise draw by hand after every run.

Two levels. For one run: :func:`print_table` and :func:`plot_run_summary` (what ``lottery search cs``
prints). For many runs (``lottery report RUN_DIRS...``): :func:`write_report` gathers every
``results.json`` at or below the given folders, groups the runs that differ only in their seed
(:func:`summarize`), decides which tickets match the dense network (METHODS.md: mean test accuracy
within 0.2 percentage points of the dense mean of the same model, data and recipe), and writes a
table (CSV and Markdown), accuracy-against-density plots, the per-layer density of one ticket and the
training cost of finding K tickets with CS against IMP (PNG and SVG).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

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


def plot_accuracy_vs_density(
    points: Sequence[dict[str, Any]], path: Path, *, dense_accuracy: float | None = None, title: str = "",
    dense_std: float | None = None,
) -> None:
    """Test accuracy against density (log axis), one series per ``method``; saved as PNG (and SVG).

    A point's ``test_accuracy_std`` becomes its error bar; ``dense_std`` draws the dense accuracy as a
    band (mean +- std) around its line.
    """
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
        ax.axhline(100 * dense_accuracy, color="gray", linestyle="--",
                   label="dense" if dense_std is None else f"dense (mean ± std)")
        if dense_std:
            ax.axhspan(100 * (dense_accuracy - dense_std), 100 * (dense_accuracy + dense_std), color="gray", alpha=0.2)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    # Percent kept as plain numbers (100, 10, 1), not powers of ten.
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.invert_xaxis()
    ax.set_xlabel("density (% of prunable weights kept, log scale)")
    ax.set_ylabel("test accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    from lottery.io import save_figure

    save_figure(fig, path, dpi=120)
    save_figure(fig, path.with_suffix(".svg"))
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


# == many runs: `lottery report` ===================================================================
MATCH_TOLERANCE = 0.002  # 0.2 percentage points, on accuracies stored as fractions (METHODS.md)

# Hparams that tell apart runs of one method (a CS run's s0 and lam, an IMP level); runs that differ
# only in their seed are grouped. A results field listed here and present (not None) joins the key.
DISTINGUISHING = ("s0", "lam", "rounds", "target_density", "rate", "scope", "rewind", "finetune_epochs", "level",
                  "control_seed")


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> list[Path]:
    path = Path(path)
    from lottery.io import save_figure

    save_figure(fig, path.with_suffix(".png"), dpi=120)
    save_figure(fig, path.with_suffix(".svg"))
    _mpl().close(fig)
    return [path.with_suffix(".png"), path.with_suffix(".svg")]


def _read_json(path: Path) -> Any:
    from lottery.io import read_json

    return read_json(path)


def _find_hparams(folder: Path, depth: int = 2) -> dict[str, Any] | None:
    """The run's hparams.json: in its folder or, for a level folder of an IMP run, a parent's."""
    for p in [folder, *list(folder.parents)[:depth]]:
        f = p / "hparams.json"
        if f.is_file():
            try:
                return _read_json(f)
            except (OSError, ValueError):
                return None
    return None


def _recipe_key(hparams: dict[str, Any] | None) -> str | None:
    """Which dense network a run compares with: the hash of its data, model and training hparams."""
    if not hparams or not all(k in hparams for k in ("data", "model", "training")):
        return None
    text = json.dumps({k: hparams[k] for k in ("data", "model", "training")}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _recipe_fields(hparams: dict[str, Any] | None) -> dict[str, str]:
    """``{field: value}`` of the data, model and training hparams (to name what differs between recipes)."""
    out: dict[str, str] = {}
    for group in ("data", "model", "training"):
        for k, v in ((hparams or {}).get(group) or {}).items():
            out[k if k not in out else f"{group}.{k}"] = json.dumps(v, default=str)
    return out


def _load_record(path: Path) -> dict[str, Any] | None:
    try:
        r = _read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(r, dict) or r.get("test_accuracy") is None or r.get("density") is None:
        return None
    r = dict(r)
    folder = path.parent
    r.setdefault("run_dir", str(folder))
    m = re.fullmatch(r"level_(\d+)", folder.name)
    if m:
        # A level of an iterative run: its ticket (mask.json, weights) is the level folder.
        r["run_dir"] = str(folder)
        if r.get("level") is None:
            r["level"] = int(m.group(1))
    hparams = _find_hparams(folder)
    r["recipe"] = _recipe_key(hparams)
    r["_recipe_fields"] = _recipe_fields(hparams)
    r["_results_path"] = str(path.resolve())
    return r


def find_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The ``results.json`` of every run folder at or below ``paths``, each read once.

    Searched recursively, so a sweep's ``--out`` folder and an IMP run's ``level_*/results.json`` are
    found. A folder that has ``level_*/results.json`` below it is an IMP run whose own results.json
    summarises those levels: it is left out so that no ticket counts twice. The dense reference of a
    CS run (``dense_run_dir``) is read too, when it exists, so matching can be decided without listing
    it. Each record gets ``run_dir`` and ``recipe`` (the hash of its data, model and training hparams,
    or None when no hparams.json is found).
    """
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_file() and p.name == "results.json":
            files.append(p)
        elif p.is_dir():
            files += sorted(p.rglob("results.json"))
        else:
            from lottery.errors import ConfigError

            raise ConfigError(f"{p} is neither a run folder nor a results.json")
    seen: set[str] = set()
    records: list[dict[str, Any]] = []
    for f in files:
        key = str(f.resolve())
        if key in seen:
            continue
        seen.add(key)
        if any(f.parent.glob("level_*/results.json")):
            continue
        r = _load_record(f)
        if r is not None:
            records.append(r)
    for r in list(records):
        dense_dir = r.get("dense_run_dir")
        if dense_dir:
            f = Path(dense_dir) / "results.json"
            if f.is_file() and str(f.resolve()) not in seen:
                seen.add(str(f.resolve()))
                d = _load_record(f)
                if d is not None:
                    records.append(d)
    return records


def method_label(r: dict[str, Any]) -> str:
    """``dense``, ``cs ticket``, ``cs prune``, ``imp``, ``imp continue``...: one curve per label."""
    parts = [str(r.get("method", "?"))]
    variant = r.get("variant")
    if variant and variant != "rewind":
        parts.append(str(variant))
    if r.get("mode"):
        parts.append(str(r["mode"]))
    return " ".join(parts)


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _std(xs: Sequence[float]) -> float | None:
    """Sample standard deviation over seeds (0 for a single seed)."""
    if not xs:
        return None
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _nums(rs: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rs if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]


def _setting(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def summarize(records: Sequence[dict[str, Any]], tolerance: float = MATCH_TOLERANCE) -> list[dict[str, Any]]:
    """One row per group of runs that differ only in their seed, with means, stds and matching.

    A seed found twice in a group (the same run in two folders) counts once.

    Groups: (method label, model, dataset, recipe, the :data:`DISTINGUISHING` hparams present).
    ``matching``: the group's mean test accuracy is at least the dense mean of the same model, data
    set and recipe minus ``tolerance`` (None for dense rows, or when no dense run is known; then the
    ``dense_test_accuracy`` the runs recorded is used when they have it).
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        params = {k: r[k] for k in DISTINGUISHING if r.get(k) is not None}
        key = (method_label(r), r.get("model"), r.get("dataset"), r.get("recipe"),
               json.dumps(params, sort_keys=True, default=str))
        groups.setdefault(key, []).append(r)

    rows = []
    for (label, model, dataset, recipe, params_json), found in groups.items():
        # One run found in two places (copied folders, two --out trees) counts once per seed.
        rs, seeds_seen = [], set()
        for r in found:
            if r.get("seed") is not None and r["seed"] in seeds_seen:
                continue
            seeds_seen.add(r.get("seed"))
            rs.append(r)
        loaded = json.loads(params_json)
        params = {k: loaded[k] for k in DISTINGUISHING if k in loaded}
        acc = _nums(rs, "test_accuracy")
        rows.append({
            "method": label,
            "model": model,
            "dataset": dataset,
            "recipe": recipe,
            "params": params,
            "setting": _setting(params),
            "n_seeds": len(rs),
            "seeds": sorted(r.get("seed") for r in rs if r.get("seed") is not None),
            "density": _mean(_nums(rs, "density")),
            "density_std": _std(_nums(rs, "density")),
            "test_accuracy": _mean(acc),
            "test_accuracy_std": _std(acc),
            "epochs": _mean(_nums(rs, "epochs")),
            "continued_epochs": _mean(_nums(rs, "continued_epochs")),
            "wall_seconds": _mean(_nums(rs, "wall_seconds")),
            "run_dirs": [r.get("run_dir") for r in sorted(rs, key=lambda r: (r.get("seed") is None, r.get("seed")))],
            "_recorded_dense": sorted({(r.get("dense_run_dir"), r["dense_test_accuracy"]) for r in rs
                                       if r.get("dense_test_accuracy") is not None}, key=str),
            "_recipe_fields": rs[0].get("_recipe_fields") or {},
        })

    # The setting column shows the hparams that vary within a method's rows (all of them if none do),
    # and the recipe fields (lr, ...) that vary between the rows of one model and data set.
    for row in rows:
        peers = [r["params"] for r in rows if (r["method"], r["model"], r["dataset"]) == (row["method"], row["model"], row["dataset"])]
        varying = {k: v for k, v in row["params"].items() if len({json.dumps(p.get(k), default=str) for p in peers}) > 1}
        recipes = [r["_recipe_fields"] for r in rows if (r["model"], r["dataset"]) == (row["model"], row["dataset"])]
        differ = {k: json.loads(v) for k, v in row["_recipe_fields"].items() if len({rf.get(k) for rf in recipes}) > 1}
        row["setting"] = _setting({**differ, **(varying or row["params"])})
    for row in rows:
        row.pop("_recipe_fields")

    dense_rows = [r for r in rows if r["method"] == "dense"]
    for row in rows:
        recorded = row.pop("_recorded_dense")
        if row["method"] == "dense":
            row["dense_test_accuracy"], row["dense_test_accuracy_std"], row["matching"] = (
                row["test_accuracy"], row["test_accuracy_std"], None)
            continue
        same = [d for d in dense_rows if (d["model"], d["dataset"]) == (row["model"], row["dataset"])]
        exact = [d for d in same if d["recipe"] == row["recipe"]]
        # Without hparams.json (recipe None) a lone dense group of that model and data set is the reference.
        ref = exact[0] if exact else (same[0] if len(same) == 1 and None in (row["recipe"], same[0]["recipe"]) else None)
        # Otherwise: the dense accuracy the runs recorded, or an iterative run's own level 0 (its dense network).
        level0 = [r for r in rows if row["params"].get("level") not in (None, 0) and r["params"].get("level") == 0
                  and (r["method"], r["model"], r["dataset"], r["recipe"]) == (row["method"], row["model"], row["dataset"], row["recipe"])
                  and {k: v for k, v in r["params"].items() if k != "level"} == {k: v for k, v in row["params"].items() if k != "level"}]
        if ref is not None:
            dense_mean, dense_std = ref["test_accuracy"], ref["test_accuracy_std"]
        elif recorded:
            vals = [v for _, v in recorded]
            dense_mean, dense_std = _mean(vals), _std(vals)
        elif level0:
            dense_mean, dense_std = level0[0]["test_accuracy"], level0[0]["test_accuracy_std"]
        else:
            dense_mean = dense_std = None
        row["dense_test_accuracy"], row["dense_test_accuracy_std"] = dense_mean, dense_std
        row["matching"] = (None if dense_mean is None or row["test_accuracy"] is None
                           else row["test_accuracy"] >= dense_mean - tolerance - 1e-12)

    def order(r):
        level = r["params"].get("level")
        return (str(r["model"]), str(r["dataset"]), r["method"] != "dense", r["method"],
                level if level is not None else -1, -(r["density"] or 0.0), r["setting"])

    return sorted(rows, key=order)


def sparsest_matching(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method, model and data set: the matching group with the lowest mean density."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if r["method"] == "dense" or not r.get("matching") or r.get("density") is None:
            continue
        key = (r["method"], r["model"], r["dataset"])
        if key not in best or (r["density"], -(r["test_accuracy"] or 0.0)) < (best[key]["density"], -(best[key]["test_accuracy"] or 0.0)):
            best[key] = r
    return [best[k] for k in sorted(best, key=lambda k: tuple(map(str, k)))]


def epochs_for_tickets(rows: Sequence[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Training epochs spent to obtain K tickets, per method (and model, data set): {series: [(K, epochs)]}.

    A run's ``epochs`` counts every epoch spent to obtain its network (CS: the search rounds and the
    ticket's retraining; an IMP level: everything from the first dense epoch on, lottery.pipelines.imp).

    * CS runs are independent (parallel), so K tickets cost K runs: with the groups sorted from dense to
      sparse and ``e_i`` the mean epochs of one run of group i, ``cost_CS(K) = e_1 + ... + e_K``.
    * IMP levels are sequential, so the K-th ticket costs the chain up to level K, which is that level's
      own ``epochs``: ``cost_IMP(K) = e_K = T + K (T - k)`` (T: training length, k: rewind point).
    * IMP-C (runs with ``continued_epochs``) retrains each ticket on a side branch of its continued chain:
      ``cost(K) = continued_epochs(K - 1) + sum over L = 1..K of (e_L - continued_epochs(L - 1))``,
      i.e. the chain that produced mask K plus the K ticket retrainings (``K T + K (T - k)``).

    Rows with a ``level`` count as sequential, the others as parallel; dense rows are left out.
    """
    series: dict[str, list[tuple[int, float]]] = {}
    multi = len({(r["model"], r["dataset"]) for r in rows}) > 1
    buckets: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r["method"] == "dense" or r.get("epochs") is None:
            continue
        sequential = "level" in r["params"]
        others = {k: v for k, v in r["params"].items() if k != "level"} if sequential else {}
        buckets.setdefault((r["method"], r["model"], r["dataset"], sequential, _setting(others)), []).append(r)
    for (method, model, dataset, sequential, others), rs in buckets.items():
        name = method + (f" ({others})" if others and len([b for b in buckets if b[0] == method]) > 1 else "")
        name += f" {model}/{dataset}" if multi else ""
        points: list[tuple[int, float]] = []
        if sequential:
            by_level = {int(r["params"]["level"]): r for r in rs}
            continued = {lv: r.get("continued_epochs") for lv, r in by_level.items()}
            retrain = 0.0
            for level in sorted(by_level):
                if level < 1:
                    continue
                e = by_level[level]["epochs"]
                if continued.get(level - 1) is not None:
                    retrain += e - continued[level - 1]
                    points.append((level, continued[level - 1] + retrain))
                else:
                    points.append((level, e))
        else:
            total = 0.0
            for k, r in enumerate(sorted(rs, key=lambda r: -(r["density"] or 0.0)), start=1):
                total += r["epochs"]
                points.append((k, total))
        if points:
            series[name] = points
    return series


def plot_epochs_vs_tickets(series: dict[str, list[tuple[int, float]]], path: Path, title: str = "") -> list[Path]:
    """Epochs spent against the number of tickets found, one line per method (formula: epochs_for_tickets)."""
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        ax.plot([k for k, _ in pts], [e for _, e in pts], marker="o", label=name)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("number of tickets K")
    ax.set_ylabel("training epochs spent")
    ax.set_title(title or "cost of K tickets (CS: sum of K runs; IMP: levels up to K)")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def mask_report_path(run_dir: str | Path) -> Path:
    """The ``mask.json`` of a ticket: the file itself, in the folder, or in its one subfolder that has one."""
    p = Path(run_dir)
    if p.is_file():
        return p
    if (p / "mask.json").is_file():
        return p / "mask.json"
    found = sorted(p.rglob("mask.json"))
    if len(found) == 1:
        return found[0]
    from lottery.errors import ConfigError

    raise ConfigError(f"{p}: no single mask.json there (found {len(found)}); give the ticket's run folder")


def plot_layer_density(run_dir: str | Path, path: Path, title: str | None = None) -> list[Path]:
    """Bar chart of the kept fraction of each prunable layer of a ticket (from its mask.json)."""
    report = _read_json(mask_report_path(run_dir))
    layers = report.get("layers", {})
    names = list(layers)
    dens = [100 * float(layers[n]["density"]) for n in names]
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(names) + 2), 4))
    bars = ax.bar(range(len(names)), dens, color="tab:blue")
    for b, n in zip(bars, names):
        info = layers[n]
        ax.annotate(f"{info.get('kept', '?')}/{info.get('total', '?')}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=7)
    if report.get("density") is not None:
        ax.axhline(100 * float(report["density"]), color="tab:red", linestyle="--",
                   label=f"whole network {100 * float(report['density']):.2f}%")
        ax.legend()
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("density (% of the layer's weights kept)")
    ax.set_ylim(0, 105)
    ax.set_title(title or f"per-layer density: {Path(run_dir).name}")
    fig.tight_layout()
    return _save(fig, path)


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.2f} ± {100 * (std or 0.0):.2f}"


REPORT_COLUMNS = (
    ("method", "method", "{}"),
    ("model", "model", "{}"),
    ("dataset", "dataset", "{}"),
    ("setting", "setting", "{}"),
    ("density", "density", "{:.4g}"),
    ("acc", "test acc % (mean ± std)", "{}"),
    ("n_seeds", "seeds", "{}"),
    ("dense", "dense acc %", "{}"),
    ("match", "matches dense", "{}"),
    ("epochs", "epochs/run", "{:.1f}"),
    ("wall_seconds", "wall s/run", "{:.1f}"),
)


def _display_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "acc": _pm(r["test_accuracy"], r["test_accuracy_std"]),
             "dense": _pm(r["dense_test_accuracy"], r["dense_test_accuracy_std"]),
             "match": {True: "yes", False: "no", None: "-"}[r["matching"]],
             "setting": r["setting"] or "-"} for r in rows]


CSV_FIELDS = ("method", "model", "dataset", "setting", "n_seeds", "seeds", "density", "density_std", "test_accuracy",
              "test_accuracy_std", "dense_test_accuracy", "dense_test_accuracy_std", "matching", "epochs",
              "wall_seconds", "recipe", "run_dirs")


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The summary rows as CSV (accuracies and densities as fractions, as in results.json)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "seeds": " ".join(map(str, r["seeds"])), "run_dirs": ";".join(map(str, r["run_dirs"])),
                    "matching": "" if r["matching"] is None else str(r["matching"]).lower()})
    return buf.getvalue()


@dataclass
class Report:
    rows: list[dict[str, Any]]
    sparsest: list[dict[str, Any]]
    files: list[Path] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)

    def text(self, markdown: bool = False) -> str:
        """The table and the sparsest matching tickets, for the terminal (or Markdown)."""
        out = [format_table(_display_rows(self.rows), REPORT_COLUMNS, markdown=markdown)]
        head = "## Sparsest matching ticket per method" if markdown else "sparsest matching ticket per method:"
        out += ["", head]
        if not self.sparsest:
            out.append("(none matches its dense network within 0.2 percentage points)")
        for r in self.sparsest:
            out.append(f"{'- ' if markdown else '  '}{r['method']} {r['model']}/{r['dataset']}: density "
                       f"{r['density']:.4f} ({r['setting'] or 'no hparams'}), test acc {_pm(r['test_accuracy'], r['test_accuracy_std'])}"
                       f" vs dense {_pm(r['dense_test_accuracy'], r['dense_test_accuracy_std'])}, {r['n_seeds']} seeds"
                       f" ({r['run_dirs'][0]})")
        return "\n".join(out)


def _slug(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(str(p) for p in parts if p is not None)).strip("-")


def write_report(paths: Iterable[str | Path], out: str | Path, layers: str | Path | None = None,
                 tolerance: float = MATCH_TOLERANCE) -> Report:
    """Gather, summarise and draw the runs at or below ``paths``; write everything into ``out``.

    Files: ``report.csv``, ``report.md``, ``accuracy_vs_density_<model>_<dataset>.png/.svg`` (one per
    model and data set; points of density 0 cannot sit on the log axis and are left out),
    ``epochs_vs_tickets.png/.svg`` and ``layer_density_<run>.png/.svg`` for the ticket in ``layers``
    (default: the first sparsest matching ticket that has a mask.json).
    """
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
        dense = [r for r in mine if r["method"] == "dense"]
        points = [r for r in mine if r["method"] != "dense" and r["density"] and r["test_accuracy"] is not None]
        path = out / f"accuracy_vs_density_{_slug(model, dataset)}.png"
        ref = dense[0] if len(dense) == 1 else None
        if ref is None and points and points[0].get("dense_test_accuracy") is not None:
            ref = {"test_accuracy": points[0]["dense_test_accuracy"], "test_accuracy_std": points[0]["dense_test_accuracy_std"]}
        plot_accuracy_vs_density(points, path, dense_accuracy=ref["test_accuracy"] if ref else None,
                                 dense_std=ref["test_accuracy_std"] if ref else None, title=f"{model} on {dataset}")
        report.files += [path, path.with_suffix(".svg")]

    report.files += plot_epochs_vs_tickets(epochs_for_tickets(rows), out / "epochs_vs_tickets.png")

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
