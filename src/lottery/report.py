"""Tables and plots of results: what a user would otherwise draw by hand after every run.

Two levels. For one run: :func:`print_table` and :func:`plot_run_summary` (what ``lottery search cs``
prints). For many runs (``lottery report RUN_DIRS...``): :func:`write_report` gathers every
``results.json`` at or below the given folders, groups the runs that differ only in their seed
(:func:`summarize`), decides which tickets match the dense network (docs/methods.md: mean test accuracy
within 0.2 percentage points of the dense mean of the same model, data and recipe), and writes a
table (CSV and Markdown), accuracy-against-density plots, the per-layer density of one ticket and the
training cost of finding K tickets with CS against IMP (PNG and SVG).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import statistics
import sys
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


def human_count(v: float) -> str:
    """1234567 -> '1.23M': FLOP and parameter counts for tables and axis labels."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:g}"


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
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    # Percent kept as plain numbers, labelled at 1, 2 and 5 of every decade (1, 2, 5, 10, 20, 50, 100):
    # labels at powers of ten only leave most points between two far-apart values.
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}" if x == "density" else human_count(v)))
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=tuple(float(i) for i in range(1, 10))))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.invert_xaxis()
    ax.set_xlabel("density (% of prunable weights kept, log scale)" if x == "density" else
                  "multiply-accumulates per example (Conv and Linear weights kept, log scale)")
    ax.set_ylabel("test accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    path = Path(path)
    from lottery.io import save_figure

    save_figure(fig, path, dpi=120, bbox_inches="tight")
    save_figure(fig, path.with_suffix(".svg"), bbox_inches="tight")
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
MATCH_TOLERANCE = 0.002  # 0.2 percentage points, on accuracies stored as fractions (docs/methods.md)

# Fields of results.json that tell apart runs of one method (a CS run's s0 and lam, an IMP level, what a
# structured ticket was made from). A field listed here and present (not None) joins the run's settings,
# together with every hparam of its method groups in hparams.json (cs.*, imp.*, structured.*, ...) and the
# identity of the run it was made from; runs that differ only in their seed are grouped.
DISTINGUISHING = ("s0", "lam", "rounds", "target_density", "rate", "scope", "rewind", "finetune_epochs", "level",
                  "control_seed", "after")

# hparams.json groups that are not a method's settings: the recipe (compared through ``recipe``), the
# seed, the kind (it is the method) and the source (replaced by the source run's own settings).
_NOT_SETTINGS = ("data", "model", "training", "seed", "kind", "source")
# hparams that repeat a results field under another name.
_ALIASES = {"control.seed": "control_seed", "cs.density": "target_density"}
# The settings swept along the density axis of accuracy-against-density (every other one splits series);
# a CS ticket's density follows s0, lam and the number of rounds (each round prunes further).
_SWEPT_BY_METHOD = {"cs": ("s0", "lam", "rounds"), "l0": ("lam",), "gmp": ("target_density", "density"),
                    "magnitude": ("target_density", "density"), "oneshot": ("target_density", "density")}
_SWEPT_ALWAYS = ("target_density", "source", "source_level")
# Methods whose runs restructure another run's ticket: not ticket searches of their own.
_STRUCTURED_METHODS = ("refill", "refill+", "regroup")

_RERUN = ("delete that file and run the experiment's command again (the same command resumes from its "
          "finished stages and writes it anew)")


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


def _read_json(path: Path) -> Any:
    from lottery.io import read_json

    return read_json(path)


def _warn(message: str) -> None:
    print(f"lottery: warning: {message}", file=sys.stderr)


def _find_hparams(folder: Path, depth: int = 2) -> dict[str, Any] | None:
    """The run's hparams.json: in its folder or, for a level folder of an IMP run, a parent's."""
    for p in [folder, *list(folder.parents)[:depth]]:
        f = p / "hparams.json"
        if f.is_file():
            try:
                h = _read_json(f)
            except (OSError, ValueError):
                return None
            return h if isinstance(h, dict) else None
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


def _relocate(stored: str, stored_self: str | None, here: Path) -> str:
    """Where a folder that a results.json names (``dense_run_dir``, ``source_run``) is now.

    Runs store paths as they were given when the run started (often relative to that working folder), so
    they are read from where the results.json was found: the stored path's position relative to the
    results' own stored folder, applied to ``here``. The stored path itself is the fallback, when it exists.
    """
    candidates = []
    if stored_self and Path(stored).is_absolute() == Path(stored_self).is_absolute():
        candidates.append(Path(os.path.normpath(here / os.path.relpath(stored, stored_self))))
    candidates.append(Path(stored))
    for c in candidates:
        if c.exists():
            return str(c)
    return stored


def _cumulative_wall(folder: Path, record: dict[str, Any]) -> float | None:
    """Wall seconds spent to reach the ticket of this level: every level's own time from the dense level 0
    on, as its ``epochs`` counts them (IMP-C: the continued runs that produced its mask, and its own
    retraining only). None when a level's time is not known."""
    level = record.get("level")
    if not isinstance(level, int):
        return None
    run = folder.parent
    dirs = [run / f"level_{lv}" for lv in range(level + 1)]
    if not dirs[0].is_dir():
        # IMP with the structure step inside (levels from 1): its dense level 0 is its source IMP run's.
        source = (_find_hparams(run, depth=0) or {}).get("source")
        name = source.get("source") if isinstance(source, dict) else source
        if name:
            dirs[0] = run.parent / str(name) / "level_0"
    total = 0.0
    for lv, ldir in enumerate(dirs):
        try:
            r = record if lv == level else _read_json(ldir / "results.json")
            wall = float(r["wall_seconds"])
            if record.get("continued_epochs") is not None and lv > 0:
                cont = float(_read_json(ldir / "continued_history.json")["wall_seconds"])
                wall = wall - cont if lv == level else cont
        except (OSError, ValueError, KeyError, TypeError):
            return None
        total += wall
    return total


def _load_record(path: Path, raw: Any) -> dict[str, Any] | None:
    """One ticket (or dense network) from a parsed results.json; None when it holds none."""
    if not isinstance(raw, dict) or raw.get("test_accuracy") is None or raw.get("density") is None:
        return None
    r = dict(raw)
    folder = path.parent
    m = re.fullmatch(r"level_(\d+)", folder.name)
    # The folder this results.json called its own when it was written, to find the folders it names.
    stored_self = r.get("level_dir") if m else r.get("run_dir")
    if m and not stored_self and r.get("run_dir"):
        stored_self = str(Path(r["run_dir"]) / folder.name)
    for key in ("dense_run_dir", "source_run"):
        if r.get(key):
            r[key] = _relocate(str(r[key]), stored_self, folder)
    # The run (or, for a level of an iterative run, the ticket: mask.json, weights) is where the file is.
    r["run_dir"] = str(folder)
    r["_sequential"] = bool(m)
    if m:
        if r.get("level") is None:
            r["level"] = int(m.group(1))
        r["level_wall_seconds"] = r.get("wall_seconds")
        r["wall_seconds"] = _cumulative_wall(folder, r)
    hparams = _find_hparams(folder)
    r["recipe"] = _recipe_key(hparams)
    r["_recipe_fields"] = _recipe_fields(hparams)
    r["_results_path"] = str(path.resolve())
    r["params"] = _settings(r, hparams)
    return r


def _flatten(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _source_identity(r: dict[str, Any], hparams: dict[str, Any] | None) -> str | None:
    """The settings of the run a structured ticket or a control was made from, without its seed (so the
    runs of several seeds from their sources of the same settings group together): ``kind:hash``. The
    source folder's name when that folder is not found (then runs of different seeds do not group)."""
    source = (hparams or {}).get("source")
    name = source.get("source") if isinstance(source, dict) else source
    folders = [Path(r["source_run"])] if r.get("source_run") else []
    if name:
        folders.append(Path(r["run_dir"]).parent / str(name))
    for folder in folders:
        h = _find_hparams(folder, depth=0) if folder.is_dir() else None
        if h is not None:
            text = json.dumps({k: v for k, v in h.items() if k != "seed"}, sort_keys=True, default=str)
            return f"{h.get('kind')}:{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    if name or r.get("source_run"):
        return Path(str(name or r["source_run"])).name
    return None


def _settings(r: dict[str, Any], hparams: dict[str, Any] | None) -> dict[str, Any]:
    """Everything that tells this run apart from runs of the same method, model, data, recipe and seed:
    the :data:`DISTINGUISHING` results fields, every method hparam (``group.field``) they do not repeat,
    and the source run's identity. ``level`` is the IMP level of an iterative run's ticket; a structured
    ticket or a control records the level of its source, which becomes ``source_level``."""
    params = {k: r[k] for k in DISTINGUISHING if r.get(k) is not None}
    for key, value in _flatten({g: v for g, v in (hparams or {}).items() if g not in _NOT_SETTINGS and isinstance(v, dict)},
                               "").items():
        short = key.rsplit(".", 1)[-1]
        if short in params or _ALIASES.get(key) in params or value is None:
            continue
        params[key] = value
    source = _source_identity(r, hparams)
    if source is not None:
        params["source"] = source
        if "level" in params and not r["_sequential"]:
            params["source_level"] = params.pop("level")
    return params


def _unfinished(root: Path) -> list[str]:
    """Run folders at or below ``root`` that have not finished: no results.json yet, or a level folder
    without one (an iterative run still training its later levels), with what they have finished."""
    out = []
    folders = [root] if (root / "hparams.json").is_file() else []
    folders += sorted({f.parent for f in root.rglob("hparams.json")} - {root})
    for folder in folders:
        levels = sorted((p for p in folder.glob("level_*") if p.is_dir() and re.fullmatch(r"level_\d+", p.name)),
                        key=lambda p: int(p.name.split("_")[1]))
        done = [p for p in levels if (p / "results.json").is_file()]
        if (folder / "results.json").is_file() and len(done) == len(levels):
            continue
        what = (f"levels {', '.join(p.name.split('_')[1] for p in done)} done" if done else "nothing finished yet")
        out.append(f"{folder} ({what})")
    return out


def _gather(paths: Sequence[Path]) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """(records, damaged results.json files with the reason, unfinished run folders)."""
    from lottery.errors import ConfigError

    files: list[Path] = []
    unfinished: list[str] = []
    for p in paths:
        if not p.exists():
            raise ConfigError(f"{p} does not exist")
        if p.is_file() and p.name == "results.json":
            files.append(p)
        elif p.is_dir():
            files += sorted(p.rglob("results.json"))
            unfinished += [u for u in _unfinished(p) if u not in unfinished]
        else:
            raise ConfigError(f"{p} is neither a run folder nor a results.json")
    seen: set[str] = set()
    records: list[dict[str, Any]] = []
    damaged: list[str] = []

    def load(f: Path) -> dict[str, Any] | None:
        try:
            raw = _read_json(f)
        except (OSError, ValueError) as e:
            damaged.append(f"{f} ({' '.join(str(e).split())})")
            return None
        if not isinstance(raw, dict):
            damaged.append(f"{f} (not a JSON object)")
            return None
        return _load_record(f, raw)

    for f in files:
        key = str(f.resolve())
        if key in seen:
            continue
        seen.add(key)
        if any(f.parent.glob("level_*/results.json")):
            continue  # an iterative run's summary of the levels read one by one
        r = load(f)
        if r is not None:
            records.append(r)
    for r in list(records):
        if r.get("dense_run_dir"):
            f = Path(r["dense_run_dir"]) / "results.json"
            if f.is_file() and str(f.resolve()) not in seen:
                seen.add(str(f.resolve()))
                d = load(f)
                if d is not None:
                    records.append(d)
    return records, damaged, unfinished


def find_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The ``results.json`` of every run folder at or below ``paths``, each read once.

    Searched recursively, so a sweep's ``--out`` folder and an IMP run's ``level_*/results.json`` are
    found. A folder that has ``level_*/results.json`` below it is an IMP run whose own results.json
    summarises those levels: it is left out so that no ticket counts twice. The dense reference of a
    CS run (``dense_run_dir``) is read too, when it exists, so matching can be decided without listing
    it. Each record gets ``run_dir`` (the folder its results.json is in: paths stored inside are read from
    there, not from the current folder), ``recipe`` (the hash of its data, model and training hparams, or
    None when no hparams.json is found) and ``params`` (:func:`_settings`).

    A damaged results.json is a warning on stderr naming it and the fix, and is left out; when nothing
    usable is left, a ``ConfigError`` names the damaged files. Runs that have not finished (an IMP run
    training its later levels) count with what they have finished, in one note on stderr.
    """
    from lottery.errors import ConfigError

    paths = [Path(p) for p in paths]
    records, damaged, unfinished = _gather(paths)
    if not records and damaged:
        raise ConfigError(f"no usable results.json at or below {', '.join(map(str, paths))}: "
                          f"{'; '.join(damaged)} cannot be read; {_RERUN}")
    for d in damaged:
        _warn(f"{d} cannot be read and is left out; {_RERUN}")
    if unfinished and records:
        many = len(unfinished) > 1
        print(f"lottery: note: {len(unfinished)} run{'s are' if many else ' is'} in progress (or stopped: the same "
              f"command resumes {'them' if many else 'it'}), included for what has finished: {'; '.join(unfinished)}",
              file=sys.stderr)
    if not records and unfinished:
        raise ConfigError(f"no finished run at or below {', '.join(map(str, paths))}: "
                          f"{'; '.join(unfinished)}; wait for them (or run their command again to resume)")
    return records


def method_label(r: dict[str, Any]) -> str:
    """``dense``, ``cs ticket``, ``cs prune``, ``imp``, ``imp continue``...: one curve per label."""
    parts = [str(r.get("method", "?"))]
    variant = r.get("variant")
    if variant and variant != "rewind":
        parts.append(str(variant))
    if r.get("mode"):
        parts.append(str(r["mode"]))
    if str(r.get("kind", "")).startswith("structure-imp-"):
        parts.append("in imp")  # structured at every IMP level, not after a finished search
    return " ".join(parts)


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _std(xs: Sequence[float]) -> float | None:
    """Sample standard deviation over seeds (n - 1); None for a single seed, which has none."""
    return statistics.stdev(xs) if len(xs) > 1 else None


def _nums(rs: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rs if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]


def _setting(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _dense_references(records: Sequence[dict[str, Any]]) -> dict[tuple, float]:
    """``(model, dataset, recipe, seed) -> dense test accuracy`` from every finished dense training found:
    a ``train`` run first, else an iterative run's level 0 (its dense network), else the dense accuracy a
    run recorded. Any method of that recipe and seed compares with it."""
    best: dict[tuple, tuple[int, float]] = {}
    for r in records:
        if r.get("method") == "dense":
            found = (0, r["test_accuracy"])
        elif r.get("_sequential") and r.get("level") == 0 and float(r.get("density") or 0.0) >= 1.0:
            found = (1, r["test_accuracy"])
        elif r.get("dense_test_accuracy") is not None:
            found = (2, r["dense_test_accuracy"])
        else:
            continue
        key = (r.get("model"), r.get("dataset"), r.get("recipe"), r.get("seed"))
        if key not in best or found[0] < best[key][0]:
            best[key] = found
    return {k: float(v) for k, (_, v) in best.items()}


def _dense_of(row: dict[str, Any], refs: dict[tuple, float]) -> list[float]:
    """The dense accuracies a row compares with: those of its own seeds, else of every seed of its recipe;
    without hparams.json (recipe None) the one recipe of its model and data set that has any."""
    mine = {k: v for k, v in refs.items() if k[:2] == (row["model"], row["dataset"])}
    same = {k[3]: v for k, v in mine.items() if k[2] == row["recipe"]}
    if not same and len({k[2] for k in mine}) == 1 and None in (row["recipe"], *(k[2] for k in mine)):
        same = {k[3]: v for k, v in mine.items()}
    paired = [same[s] for s in row["seeds"] if s in same]
    return paired or list(same.values())


def _mask_convergence(rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Worst case over the seeds and search rounds of CS runs' mask convergence figures (results.json's
    ``convergence``): the largest undecided fraction, the largest soft-hard accuracy gap, and whether
    every round of every seed converged. None where the runs record none (other methods, older runs)."""
    rounds = [c for r in rs for c in (r.get("convergence") or [])]
    if not rounds:
        return {"mask_undecided_max": None, "mask_gap_max": None, "mask_converged": None}
    return {"mask_undecided_max": max(c["undecided"] for c in rounds),
            "mask_gap_max": max(abs(c["soft_hard_gap"]) for c in rounds),
            "mask_converged": all(bool(c["converged"]) for c in rounds)}


def _mask_cell(row: dict[str, Any]) -> str:
    if row.get("mask_converged") is None:
        return "-"
    detail = f"{100 * row['mask_undecided_max']:.2f} % undecided, gap {100 * row['mask_gap_max']:.2f}"
    return ("yes" if row["mask_converged"] else "NO") + f" ({detail})"


def summarize(records: Sequence[dict[str, Any]], tolerance: float = MATCH_TOLERANCE) -> list[dict[str, Any]]:
    """One row per group of runs that differ only in their seed, with means, stds and matching.

    Groups: (method label, model, dataset, recipe, the run's settings ``params``: :func:`_settings`). A
    results.json found twice (the same file by two paths) counts once; two different folders with the
    same settings and seed are a warning naming both, and the first counts.

    ``matching``: the group's mean test accuracy is at least the mean dense accuracy of the same model,
    data set, recipe and seeds minus ``tolerance`` (:func:`_dense_references`; None for dense networks,
    or when no dense training is known).
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        params = r.get("params")
        if params is None:
            params = {k: r[k] for k in DISTINGUISHING if r.get(k) is not None}
        key = (method_label(r), r.get("model"), r.get("dataset"), r.get("recipe"),
               json.dumps(params, sort_keys=True, default=str))
        groups.setdefault(key, []).append({**r, "params": params})

    rows = []
    for (label, model, dataset, recipe, _), found in groups.items():
        rs: list[dict[str, Any]] = []
        by_seed: dict[Any, dict[str, Any]] = {}
        paths: set[Any] = set()
        for r in found:
            path = r.get("_results_path") or id(r)
            if path in paths:
                continue
            paths.add(path)
            seed = r.get("seed")
            if seed is not None and seed in by_seed:
                _warn(f"{by_seed[seed].get('run_dir')} and {r.get('run_dir')} hold runs with the same settings "
                      f"and seed {seed} ({label}); only the first counts")
                continue
            by_seed[seed] = r
            rs.append(r)
        params = rs[0]["params"]
        acc = _nums(rs, "test_accuracy")
        rows.append({
            "method": label,
            "model": model,
            "dataset": dataset,
            "recipe": recipe,
            "kind": rs[0].get("kind"),
            "params": params,
            "setting": _setting(params),
            "n_seeds": len(rs),
            "seeds": sorted(r.get("seed") for r in rs if r.get("seed") is not None),
            "density": _mean(_nums(rs, "density")),
            "density_std": _std(_nums(rs, "density")),
            "test_accuracy": _mean(acc),
            "test_accuracy_std": _std(acc),
            "flops_dense": _mean(_nums(rs, "flops_dense")),
            "flops_sparse": _mean(_nums(rs, "flops_sparse")),
            "params_nonzero": _mean(_nums(rs, "params_nonzero")),
            "theoretical_speedup": _mean(_nums(rs, "theoretical_speedup")),
            "epochs": _mean(_nums(rs, "epochs")),
            "continued_epochs": _mean(_nums(rs, "continued_epochs")),
            "wall_seconds": _mean(_nums(rs, "wall_seconds")),
            "run_dirs": [r.get("run_dir") for r in sorted(rs, key=lambda r: (r.get("seed") is None, r.get("seed")))],
            "_recipe_fields": rs[0].get("_recipe_fields") or {},
            **_mask_convergence(rs),
        })

    # The setting column shows the hparams that vary within a method's rows (the results' own fields if
    # none do), and the recipe fields (lr, ...) that vary between the rows of one model and data set.
    for row in rows:
        peers = [r["params"] for r in rows if (r["method"], r["model"], r["dataset"]) == (row["method"], row["model"], row["dataset"])]
        keys = [k for k in dict.fromkeys(k for p in peers for k in p)
                if len({json.dumps(p.get(k), default=str) for p in peers}) > 1]
        # The source's identity (a hash) only where nothing readable tells the rows apart.
        readable = [k for k in keys if k != "source"]
        if "source" in keys and len({json.dumps([p.get(k) for k in readable], default=str) for p in peers}) == len(peers):
            keys = readable
        shown = {k: row["params"][k] for k in keys if k in row["params"]} if keys else \
            {k: v for k, v in row["params"].items() if k in DISTINGUISHING}
        recipes = [r["_recipe_fields"] for r in rows if (r["model"], r["dataset"]) == (row["model"], row["dataset"])]
        differ = {k: json.loads(v) for k, v in row["_recipe_fields"].items() if len({rf.get(k) for rf in recipes}) > 1}
        row["setting"] = _setting({**differ, **shown})
    for row in rows:
        row.pop("_recipe_fields")

    refs = _dense_references(records)
    for row in rows:
        if row["method"] == "dense" or row["params"].get("level") == 0:
            # A dense network (a train run, an iterative run's level 0) is the reference, not a ticket.
            row["dense_test_accuracy"], row["dense_test_accuracy_std"], row["matching"] = (
                row["test_accuracy"], row["test_accuracy_std"], None)
            continue
        dense = _dense_of(row, refs)
        dense_mean, dense_std = _mean(dense), _std(dense)
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


def _is_search(r: dict[str, Any]) -> bool:
    """A ticket search's row: not dense, not a structured ticket or a control made from another run's."""
    kind = str(r.get("kind") or "")
    return (r["method"] != "dense" and r["method"].split()[0] not in _STRUCTURED_METHODS
            and not kind.startswith(("structure-", "control-")))


def epochs_for_tickets_by_data(rows: Sequence[dict[str, Any]]) -> dict[tuple, dict[str, list[tuple[int, float]]]]:
    """:func:`epochs_for_tickets` per (model, data set): ``{(model, dataset): {series: [(K, epochs)]}}``."""
    out: dict[tuple, dict[str, list[tuple[int, float]]]] = {}
    buckets: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if not _is_search(r) or r.get("epochs") is None:
            continue
        sequential = "level" in r["params"]
        others = json.dumps({k: v for k, v in r["params"].items() if k != "level"} if sequential else {},
                            sort_keys=True, default=str)
        buckets.setdefault((r["method"], r["model"], r["dataset"], sequential, others), []).append(r)
    for (method, model, dataset, sequential, others_json), rs in buckets.items():
        # Several series of one method: named by the settings that differ between them (rewind=0it, ...).
        siblings = [json.loads(b[4]) for b in buckets if b[:3] == (method, model, dataset)]
        others = json.loads(others_json)
        differ = {k: v for k, v in others.items() if len({json.dumps(s.get(k), default=str) for s in siblings}) > 1}
        name = method + (f" ({_setting(differ)})" if differ else "")
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
            out.setdefault((model, dataset), {})[name] = points
    return out


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

    Rows with a ``level`` count as sequential, the others as parallel; an iterative run of other settings
    (rewind 0it and 1ep) is a series of its own. Dense rows, structured tickets (refill, refill+, regroup:
    made from another search's ticket) and controls are not ticket searches and are left out.
    """
    by_data = epochs_for_tickets_by_data(rows)
    multi = len(by_data) > 1
    return {name + (f" {model}/{dataset}" if multi else ""): pts
            for (model, dataset), series in by_data.items() for name, pts in series.items()}


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
            out.append("(none matches its dense network within 0.2 percentage points)")
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
