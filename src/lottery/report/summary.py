"""Finding results.json files and summarising them: grouping over seeds, matching the dense network,
the sparsest matching ticket, epochs spent per ticket."""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from lottery.io import relocated_path


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


_relocate = relocated_path  # shared with the pipelines, which reuse moved run folders the same way


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
        hp_file = next((p / "hparams.json" for p in [f.parent, *list(f.parent.parents)[:2]]
                        if (p / "hparams.json").is_file()), None)
        if hp_file is not None:  # the run's settings: without them it would be grouped with other runs
            try:
                hp = _read_json(hp_file)
                problem = None if isinstance(hp, dict) else "not a JSON object"
            except (OSError, ValueError) as e:
                problem = " ".join(str(e).split())
            if problem is not None:
                _warn(f"{f.parent} is left out: its {hp_file} cannot be read ({problem}), so its settings are "
                      "unknown; restore that file or run the experiment again in another --out")
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
    """Per method, model and data set: the matching group with the lowest mean density. A group that
    pruned nothing (density 1: CS whose mask kept everything, a rate of 0) is no ticket, matching or not."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if r["method"] == "dense" or not r.get("matching") or r.get("density") is None or r["density"] >= 1.0:
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
