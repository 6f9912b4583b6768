"""`lottery report`: grouping over seeds, matching against the dense network, files, on hand-written results."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from lottery import report
from lottery.errors import ConfigError
from lottery.report import epochs_for_tickets, find_results, summarize, write_report

DATA = {"dataset": "synthetic", "val_size": 50}
MODEL = {"model": "lenet_300_100"}
RECIPE = {"training_steps": "2ep", "lr": 0.1}
OTHER_RECIPE = {"training_steps": "2ep", "lr": 0.05}

DENSE_ACC = [0.90, 0.91, 0.92]
CS_RUNS = {  # s0 -> (densities, accuracies) over seeds 0, 1, 2
    0.05: ([0.30, 0.32, 0.34], [0.909, 0.908, 0.910]),  # mean 0.909 >= 0.91 - 0.002: matches
    -0.05: ([0.10, 0.11, 0.12], [0.905, 0.906, 0.904]),  # mean 0.905: does not
}
IMP_ACC = {0: [0.90, 0.91, 0.92], 1: [0.912, 0.911, 0.913], 2: [0.909, 0.910, 0.911], 3: [0.90, 0.89, 0.895]}


def _write(folder: Path, results: dict, hparams: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))
    if hparams is not None:
        (folder / "hparams.json").write_text(json.dumps(hparams))


def _mask_json(folder: Path, kept: tuple[int, int]) -> None:
    layers = {"fc1.weight": {"kept": kept[0], "total": 100, "density": kept[0] / 100, "shape": [10, 10]},
              "fc2.weight": {"kept": kept[1], "total": 50, "density": kept[1] / 50, "shape": [5, 10]}}
    total = sum(kept)
    (folder / "mask.json").write_text(json.dumps({"density": total / 150, "sparsity": 1 - total / 150, "kept": total,
                                                  "total": 150, "layers": layers}))


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    common = {"model": "lenet_300_100", "dataset": "synthetic"}
    for seed in range(3):
        hp = {"kind": "train", "seed": seed, "data": DATA, "model": MODEL, "training": RECIPE}
        _write(root / f"train_s{seed}", {**common, "kind": "train", "method": "dense", "seed": seed, "density": 1.0,
                                         "test_accuracy": DENSE_ACC[seed], "epochs": 2.0, "wall_seconds": 1.0 + seed}, hp)
        # A dense network of another recipe: no CS or IMP run compares with it.
        _write(root / f"train_lr_s{seed}", {**common, "kind": "train", "method": "dense", "seed": seed, "density": 1.0,
                                            "test_accuracy": 0.5, "epochs": 2.0, "wall_seconds": 1.0},
               {**hp, "training": OTHER_RECIPE})
        for s0, (dens, accs) in CS_RUNS.items():
            folder = root / f"search-cs_{s0}_s{seed}"
            _write(folder, {**common, "kind": "search-cs", "method": "cs", "mode": "ticket", "seed": seed, "s0": s0,
                            "lam": 1e-8, "rounds": 1, "rewind": "2it", "density": dens[seed], "test_accuracy": accs[seed],
                            "epochs": 2.75, "wall_seconds": 3.0, "dense_test_accuracy": DENSE_ACC[seed],
                            "dense_run_dir": str(root / f"train_s{seed}")},
                   {**hp, "kind": "search-cs", "cs": {"s0": s0}})
            _mask_json(folder, (int(100 * dens[seed]), int(50 * dens[seed])))
        # An IMP run: levels in subfolders, hparams.json and a summary results.json at the top.
        imp = root / f"imp_s{seed}"
        _write(imp, {**common, "method": "imp", "seed": seed, "density": 0.512, "test_accuracy": 0.1},
               {**hp, "kind": "imp", "imp": {"levels": 3}})
        for level, accs in IMP_ACC.items():
            # As lottery.pipelines.imp writes them: run_dir is the IMP run's folder, epochs count every
            # epoch from the first dense one (T + L (T - k) with T = 2, k = 0.5).
            _write(imp / f"level_{level}", {**common, "method": "imp", "seed": seed, "density": 0.8 ** level,
                                            "test_accuracy": accs[seed], "epochs": 2.0 + 1.5 * level,
                                            "wall_seconds": 1.0, "rate": 0.2, "rewind": "1it", "run_dir": str(imp)})
        _mask_json(imp / "level_2", (64, 32))
    return root


def _row(rows, method, **params):
    (row,) = [r for r in rows if r["method"] == method and all(r["params"].get(k) == v for k, v in params.items())]
    return row


def test_groups_over_seeds_and_matches_the_dense_network_of_the_same_recipe(runs):
    records = find_results([runs])
    # 6 dense, 6 CS, 12 IMP levels; the IMP runs' summary results.json files are not tickets.
    assert len(records) == 6 + 6 + 12
    rows = summarize(records)
    dense = [r for r in rows if r["method"] == "dense"]
    assert sorted(r["test_accuracy"] for r in dense) == pytest.approx([0.5, 0.91])
    ref = max(dense, key=lambda r: r["test_accuracy"])
    assert ref["test_accuracy_std"] == pytest.approx(0.01) and ref["n_seeds"] == 3 and ref["matching"] is None
    assert ref["wall_seconds"] == pytest.approx(2.0) and ref["seeds"] == [0, 1, 2]

    good, bad = _row(rows, "cs ticket", s0=0.05), _row(rows, "cs ticket", s0=-0.05)
    assert good["density"] == pytest.approx(0.32) and good["test_accuracy"] == pytest.approx(0.909)
    assert good["test_accuracy_std"] == pytest.approx(statistics.stdev(CS_RUNS[0.05][1]))
    assert good["dense_test_accuracy"] == pytest.approx(0.91) and good["matching"] is True
    assert bad["test_accuracy"] == pytest.approx(0.905) and bad["matching"] is False
    assert good["n_seeds"] == bad["n_seeds"] == 3 and good["epochs"] == 2.75
    # The setting names what differs between CS rows, and the recipe field that differs between the
    # dense networks of this model and data set.
    assert good["setting"] == "lr=0.1 s0=0.05"
    assert {r["setting"] for r in dense} == {"lr=0.1", "lr=0.05"}

    levels = {lv: _row(rows, "imp", level=lv) for lv in IMP_ACC}
    assert [levels[lv]["matching"] for lv in (1, 2, 3)] == [True, True, False]
    assert levels[3]["density"] == pytest.approx(0.512) and levels[2]["test_accuracy"] == pytest.approx(0.910)
    assert len(rows) == 2 + 2 + 4

    best = {r["method"]: r for r in report.sparsest_matching(rows)}
    assert set(best) == {"cs ticket", "imp"}
    assert best["cs ticket"]["params"]["s0"] == 0.05 and best["imp"]["params"]["level"] == 2

    # CS: K tickets cost K runs; IMP: the K-th ticket costs levels 0..K one after another.
    series = epochs_for_tickets(rows)
    assert series["cs ticket"] == [(1, 2.75), (2, 5.5)]
    assert series["imp"] == [(1, 3.5), (2, 5.0), (3, 6.5)]
    assert levels[2]["run_dirs"][0].endswith("level_2") and levels[2]["setting"] == "lr=0.1 level=2"


def test_imp_c_tickets_are_side_branches_of_the_continued_chain():
    # T = 2, k = 0: level L's ticket has epochs L T + (T - k), its continued run (L + 1) T.
    rows = [{"method": "imp-c", "model": "m", "dataset": "d", "params": {"level": lv, "rate": 0.2}, "density": 0.8 ** lv,
             "epochs": 2.0 * lv + 2.0, "continued_epochs": 2.0 * (lv + 1)} for lv in range(4)]
    # K tickets: the chain up to mask K, (K - 1) continued runs after the dense one, plus K retrainings.
    assert epochs_for_tickets(rows) == {"imp-c": [(1, 4.0), (2, 8.0), (3, 12.0)]}


def test_write_report_files_and_numbers(runs, tmp_path):
    out = tmp_path / "report"
    rep = write_report([runs], out)
    for name in ("report.csv", "report.md", "accuracy_vs_density_lenet_300_100_synthetic.png",
                 "accuracy_vs_density_lenet_300_100_synthetic.svg", "epochs_vs_tickets.png", "epochs_vs_tickets.svg"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    # Per-layer density: by default of the sparsest matching ticket (CS, seed 0), else the one asked for.
    assert (out / "layer_density_search-cs_0.05_s0.png").is_file() and (out / "layer_density_search-cs_0.05_s0.svg").is_file()
    rep2 = write_report([runs], tmp_path / "r2", layers=runs / "imp_s0" / "level_2")
    assert (tmp_path / "r2" / "layer_density_level_2.svg") in rep2.files

    with open(out / "report.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rep.rows) == 8
    cs = [r for r in table if r["method"] == "cs ticket" and r["setting"] == "lr=0.1 s0=0.05"][0]
    assert float(cs["test_accuracy"]) == pytest.approx(0.909) and cs["matching"] == "true" and cs["n_seeds"] == "3"
    assert float(cs["dense_test_accuracy"]) == pytest.approx(0.91) and cs["seeds"] == "0 1 2"
    md = (out / "report.md").read_text()
    assert "| method |" in md and "90.90 ± 0.10" in md and "Sparsest matching ticket" in md
    text = rep.text()
    assert "cs ticket lenet_300_100/synthetic: density 0.3200 (lr=0.1 s0=0.05)" in text
    assert "imp lenet_300_100/synthetic: density 0.6400 (lr=0.1 level=2)" in text


def test_a_run_found_twice_counts_once(tmp_path, runs):
    import shutil

    shutil.copytree(runs / "train_s0", tmp_path / "copy" / "train_s0")
    rows = summarize(find_results([runs, tmp_path / "copy", runs / "train_s1"]))
    ref = [r for r in rows if r["method"] == "dense" and r["test_accuracy"] > 0.6][0]
    assert ref["n_seeds"] == 3 and ref["test_accuracy"] == pytest.approx(0.91)


def test_dense_reference_found_without_listing_it_and_without_hparams(tmp_path, runs):
    # Only CS runs are given: their dense_run_dir leads to the dense results.
    rows = summarize(find_results(sorted(runs.glob("search-cs_*"))))
    assert _row(rows, "cs ticket", s0=0.05)["matching"] is True and _row(rows, "dense")["n_seeds"] == 3
    # No hparams.json anywhere: the lone dense group of the model and data set is the reference.
    bare = tmp_path / "bare"
    for seed, acc in enumerate([0.8, 0.8]):
        _write(bare / f"d{seed}", {"method": "dense", "model": "m", "dataset": "d", "seed": seed, "density": 1.0,
                                   "test_accuracy": acc})
        _write(bare / f"c{seed}", {"method": "cs", "mode": "prune", "model": "m", "dataset": "d", "seed": seed,
                                   "s0": 0.0, "density": 0.5, "test_accuracy": 0.7985})
    rows = summarize(find_results([bare]))
    assert _row(rows, "cs prune")["matching"] is True and _row(rows, "cs prune")["test_accuracy_std"] == 0.0


def test_report_command(runs, tmp_path, capsys):
    from lottery.cli.common import OneLineErrorParser, common_flags
    from lottery.cli.sweep import register

    parser = OneLineErrorParser(prog="lottery")
    register(parser.add_subparsers(dest="command", parser_class=OneLineErrorParser), common_flags)
    args = parser.parse_args(["report", str(runs), "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "test acc % (mean ± std, n-1)" in out and "sparsest matching ticket per method" in out
    assert (tmp_path / "out" / "report.md").is_file()
    with pytest.raises(ConfigError, match="missing does not exist"):
        write_report([tmp_path / "missing"], tmp_path / "x")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="neither a run folder nor a results.json"):
        write_report([tmp_path / "notes.txt"], tmp_path / "x")


def test_single_run_plot_still_works(runs, tmp_path):
    results = json.loads((runs / "search-cs_0.05_s0" / "results.json").read_text())
    results["run_dir"] = str(tmp_path / "one")
    path = report.plot_run_summary(runs, results)
    assert path.is_file() and path.with_suffix(".svg").is_file()


# == defects found on real run folders ============================================================
CONV = {"model": "conv4", "dataset": "synthetic"}
CONV_HP = {"data": DATA, "model": {"model": "conv4"}, "training": RECIPE}


def _imp_run(folder: Path, seed: int, accs: list[float], walls: list[float], rewind: str = "1it",
             model: dict = CONV, hp: dict = CONV_HP, run_dir: str | None = None, **extra) -> None:
    """An IMP run as lottery.pipelines.imp writes it: hparams.json, level_<L>/results.json, a summary."""
    _write(folder, {**model, "method": "imp", "seed": seed, "levels": []},
           {**hp, "kind": "search-imp", "seed": seed, "imp": {"rate": 0.5, "rewind": rewind, "variant": "rewind"}})
    for level, (acc, wall) in enumerate(zip(accs, walls)):
        _write(folder / f"level_{level}", {**model, "kind": "search-imp", "method": "imp", "seed": seed,
                                           "level": level, "density": 0.5 ** level, "test_accuracy": acc,
                                           "epochs": 2.0 + 1.5 * level, "wall_seconds": wall, "rate": 0.5,
                                           "rewind": rewind, "run_dir": run_dir or str(folder), **extra})


def _cs_run(folder: Path, seed: int, s0: float, acc: float, density: float, hp: dict = CONV_HP, **extra) -> None:
    _write(folder, {**CONV, "kind": "search-cs", "method": "cs", "mode": "ticket", "seed": seed, "s0": s0,
                    "lam": 1e-8, "rounds": 2, "rewind": "1it", "density": density, "test_accuracy": acc,
                    "epochs": 3.0, "search_epochs": 2.0, "wall_seconds": 5.0, **extra},
           {**hp, "kind": "search-cs", "seed": seed, "cs": {"s0": s0, "lam": 1e-8, "rounds": 2, "rewind": "1it"}})


def _structured(folder: Path, seed: int, source: Path, after: str, acc: float, density: float,
                fillback: float = 0.2, level: int | None = None) -> None:
    st = {"method": "refill+", "score": "l1", "fillback_rate": fillback, "seed": 0}
    _write(folder, {**CONV, "kind": "structure-refill-plus", "method": "refill+", "after": after, "level": level,
                    "seed": seed, "density": density, "test_accuracy": acc, "epochs": 4.0, "retrain_epochs": 1.0,
                    "wall_seconds": 2.0, "rewind": "1it", "structured": st, "source_run": str(source),
                    "run_dir": str(folder)},
           {**CONV_HP, "kind": "structure-refill-plus", "seed": seed, "structured": st,
            "source": {"after": after, "every_level": False, "level": -1 if level is None else level,
                       "source": source.name}})


def _rows_of(rows, method):
    return [r for r in rows if r["method"] == method]


def test_runs_differing_in_structured_settings_or_source_are_not_merged(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed in (0, 1):
        _cs_run(root / f"cs_s{seed}", seed, 0.0, 0.85, 0.1)
        _structured(root / f"refill_cs_s{seed}", seed, root / f"cs_s{seed}", "cs", 0.80, 0.3)
    _imp_run(root / "imp_s0", 0, [0.85, 0.86, 0.855], [10.0, 5.0, 6.0])
    _structured(root / "refill_imp_s0", 0, root / "imp_s0", "imp", 0.81, 0.4, level=2)
    _structured(root / "refill_cs_half_s0", 0, root / "cs_s0", "cs", 0.82, 0.5, fillback=0.5)
    # A CS search of other settings: a structured ticket from it is another row.
    _cs_run(root / "cs_other_s0", 0, -0.1, 0.84, 0.05)
    _structured(root / "refill_cs_other_s0", 0, root / "cs_other_s0", "cs", 0.79, 0.2)
    rows = summarize(find_results([root]))
    refill = _rows_of(rows, "refill+")
    assert sorted((r["n_seeds"], round(r["test_accuracy"], 6)) for r in refill) == [
        (1, 0.79), (1, 0.81), (1, 0.82), (2, 0.80)]
    assert len({r["setting"] for r in refill}) == 4
    assert {r["params"]["after"] for r in refill} == {"cs", "imp"}
    assert [r["params"]["source_level"] for r in refill if r["params"]["after"] == "imp"] == [2]
    assert "same settings" not in capsys.readouterr().err

    # The same folder found twice counts once, silently; a copy in another folder is a warning naming both.
    import shutil

    shutil.copytree(root / "refill_imp_s0", tmp_path / "copy" / "refill_imp_s0")
    rows = summarize(find_results([root, root / "refill_imp_s0", tmp_path / "copy"]))
    (row,) = [r for r in _rows_of(rows, "refill+") if r["params"]["after"] == "imp"]
    assert row["n_seeds"] == 1 and row["run_dirs"] == [str(root / "refill_imp_s0")]
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and str(root / "refill_imp_s0") in err
    assert str(tmp_path / "copy" / "refill_imp_s0") in err


def test_any_dense_training_of_the_recipe_and_seed_is_the_reference_of_every_method(tmp_path):
    root = tmp_path / "runs"
    _cs_run(root / "cs_s0", 0, 0.0, 0.855, 0.1)  # no dense accuracy recorded, no train run
    _imp_run(root / "imp_s0", 0, [0.86, 0.87], [10.0, 5.0])
    _cs_run(root / "cs_s1", 1, 0.0, 0.70, 0.1, dense_test_accuracy=0.80)  # seed 1: recorded only
    rows = summarize(find_results([root]))
    (cs,) = _rows_of(rows, "cs ticket")
    assert cs["dense_test_accuracy"] == pytest.approx((0.86 + 0.80) / 2) and cs["matching"] is False
    # Another recipe's dense network is never the reference.
    other = tmp_path / "other"
    _cs_run(other / "cs_s0", 0, 0.0, 0.855, 0.1, hp={**CONV_HP, "training": OTHER_RECIPE})
    _imp_run(other / "imp_s0", 0, [0.86, 0.87], [10.0, 5.0])
    rows = summarize(find_results([other]))
    assert _rows_of(rows, "cs ticket")[0]["dense_test_accuracy"] is None


def test_paths_in_results_are_read_from_where_the_results_are(tmp_path, monkeypatch):
    # Runs started in another working folder with --out benchmarks/out, then read from elsewhere.
    root = tmp_path / "moved" / "benchmarks" / "out"
    stored = "benchmarks/out"
    _write(root / "train_s0", {**CONV, "kind": "train", "method": "dense", "seed": 0, "density": 1.0,
                               "test_accuracy": 0.86, "run_dir": f"{stored}/train_s0"},
           {**CONV_HP, "kind": "train", "seed": 0})
    _cs_run(root / "cs_s0", 0, 0.0, 0.861, 0.1, dense_test_accuracy=0.86, run_dir=f"{stored}/cs_s0",
            dense_run_dir=f"{stored}/train_s0")
    _mask_json(root / "cs_s0", (10, 5))
    _imp_run(root / "imp_s0", 0, [0.86, 0.87], [10.0, 5.0], run_dir=f"{stored}/imp_s0")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    records = find_results([root / "cs_s0"])  # the dense run is found through dense_run_dir
    assert {r["method"] for r in records} == {"cs", "dense"}
    assert {r["run_dir"] for r in records} == {str(root / "cs_s0"), str(root / "train_s0")}
    rep = write_report([root], tmp_path / "report")
    assert tmp_path / "report" / "layer_density_cs_s0.png" in rep.files
    assert _rows_of(rep.rows, "imp")[1]["run_dirs"] == [str(root / "imp_s0" / "level_1")]


def test_wall_time_of_an_imp_level_is_cumulative_like_its_epochs(tmp_path):
    root = tmp_path / "runs"
    _imp_run(root / "imp_s0", 0, [0.86, 0.87, 0.865], [10.0, 5.0, 6.0])
    _imp_run(root / "imp_s1", 1, [0.86, 0.87, 0.865], [12.0, 7.0, 8.0])
    rows = summarize(find_results([root]))
    walls = {r["params"]["level"]: r["wall_seconds"] for r in rows}
    assert walls == pytest.approx({0: 11.0, 1: 17.0, 2: 24.0})
    # IMP with the structure step inside: levels from 1, the dense level 0 is its source's.
    s = root / "structure-imp_s0"
    _write(s, {**CONV, "method": "refill"}, {**CONV_HP, "kind": "structure-imp-refill", "seed": 0,
                                             "source": {"source": "imp_s0", "after": "imp", "every_level": True}})
    for level, wall in ((1, 3.0), (2, 4.0)):
        _write(s / f"level_{level}", {**CONV, "kind": "structure-imp-refill", "method": "refill", "after": "imp",
                                      "seed": 0, "level": level, "density": 0.5 ** level, "test_accuracy": 0.8,
                                      "epochs": 1.0, "wall_seconds": wall})
    rows = summarize(find_results([s]))
    assert {r["params"]["level"]: r["wall_seconds"] for r in rows} == pytest.approx({1: 13.0, 2: 17.0})
    assert {r["method"] for r in rows} == {"refill in imp"}
    # IMP-C: ticket L costs the dense level, the continued runs that made masks 1..L and its own retraining.
    c = tmp_path / "impc"
    _write(c, {**CONV, "method": "imp-c"}, {**CONV_HP, "kind": "search-imp-c", "seed": 0,
                                           "imp": {"rate": 0.5, "rewind": "1it", "variant": "continue"}})
    for level, (wall, cont) in enumerate([(10.0, None), (8.0, 5.0), (9.0, 5.0)]):
        _write(c / f"level_{level}", {**CONV, "method": "imp", "variant": "continue", "seed": 0, "level": level,
                                      "density": 0.5 ** level, "test_accuracy": 0.8, "epochs": 1.0,
                                      "continued_epochs": 1.0, "wall_seconds": wall, "run_dir": str(c)})
        if cont is not None:
            (c / f"level_{level}" / "continued_history.json").write_text(json.dumps({"wall_seconds": cont}))
    walls = {r["params"]["level"]: r["wall_seconds"] for r in summarize(find_results([c]))}
    assert walls == pytest.approx({0: 10.0, 1: 10.0 + 3.0, 2: 10.0 + 5.0 + 4.0})
    assert "cumulative" in report.FOOTNOTE and "wall_seconds_cumulative" in report.CSV_FIELDS


def test_damaged_results_are_named_and_unfinished_runs_noted(tmp_path, capsys):
    root = tmp_path / "runs"
    _cs_run(root / "cs_s0", 0, 0.0, 0.85, 0.1)
    bad = root / "cs_s1" / "results.json"
    _cs_run(root / "cs_s1", 1, 0.0, 0.85, 0.1)
    bad.write_text(bad.read_text()[:40])  # truncated
    # An IMP run training its level 2: levels 0 and 1 count; one note lists it.
    _imp_run(root / "imp_s0", 0, [0.86, 0.87], [10.0, 5.0])
    (root / "imp_s0" / "results.json").unlink()
    (root / "imp_s0" / "level_2").mkdir()
    records = find_results([root])
    assert sorted(r["run_dir"] for r in records) == sorted(
        [str(root / "cs_s0"), str(root / "imp_s0" / "level_0"), str(root / "imp_s0" / "level_1")])
    err = capsys.readouterr().err
    (warning,) = [line for line in err.splitlines() if "warning" in line]
    assert str(bad) in warning and "command again" in warning
    (note,) = [line for line in err.splitlines() if "note" in line]
    assert str(root / "imp_s0") in note and "in progress" in note and "levels 0, 1 done" in note
    assert str(root / "cs_s0") not in note

    (root / "cs_s0" / "results.json").write_text("")
    only_bad = [root / "cs_s0", root / "cs_s1"]
    with pytest.raises(ConfigError) as e:
        write_report(only_bad, tmp_path / "out")
    assert str(bad) in str(e.value) and str(root / "cs_s0" / "results.json") in str(e.value)
    assert "\n" not in str(e.value)


def test_plot_series_follow_the_table_and_the_dense_band_comes_from_any_reference(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    for seed in (0, 1):
        _imp_run(root / f"imp0_s{seed}", seed, [0.86, 0.87, 0.865], [1.0, 1.0, 1.0], rewind="0it")
        _imp_run(root / f"imp1_s{seed}", seed, [0.86 + seed / 100, 0.87, 0.865], [1.0, 1.0, 1.0], rewind="1ep")
    calls = []
    monkeypatch.setattr(report, "plot_accuracy_vs_density", lambda points, path, **kw: calls.append((points, kw)))
    write_report([root], tmp_path / "out")
    ((points, kw),) = calls
    series = {}
    for p in points:
        series.setdefault(p["series"], []).append(p["params"]["level"])
    assert series == {"imp (rewind=0it)": [0, 1, 2], "imp (rewind=1ep)": [0, 1, 2]}
    # No train run, only IMP: the band is the level-0 dense networks'.
    assert kw["dense_accuracy"] == pytest.approx(0.86) or kw["dense_accuracy"] == pytest.approx(0.865)
    assert kw["dense_std"] is not None

    calls.clear()
    other = tmp_path / "structured"
    _cs_run(other / "cs_s0", 0, 0.0, 0.85, 0.1)
    _cs_run(other / "cs_b_s0", 0, -0.1, 0.84, 0.05)
    _imp_run(other / "imp_s0", 0, [0.86, 0.87], [1.0, 1.0])
    _structured(other / "r_cs", 0, other / "cs_s0", "cs", 0.80, 0.3)
    _structured(other / "r_cs_b", 0, other / "cs_b_s0", "cs", 0.79, 0.2)
    _structured(other / "r_imp", 0, other / "imp_s0", "imp", 0.81, 0.4, level=1)
    write_report([other], tmp_path / "out2")
    ((points, kw),) = calls
    names = {p["series"] for p in points if p["method"] == "refill+"}
    assert names == {"refill+ (after=cs)", "refill+ (after=imp)"}
    assert len([p for p in points if p["series"] == "refill+ (after=cs)"]) == 2  # swept: the source
    assert {p["series"] for p in points if p["method"] == "cs ticket"} == {"cs ticket"}  # s0 is swept


def _capture_figures(monkeypatch) -> list:
    from lottery.report import plots as report_plots  # where the plots look _save up

    figs = []
    original = report_plots._save

    def save(fig, path):
        fig.canvas.draw()
        figs.append(fig)
        return original(fig, path)

    monkeypatch.setattr(report_plots, "_save", save)
    return figs


def test_epochs_vs_tickets_leaves_out_structured_runs_has_a_panel_per_data_and_an_outside_legend(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    _cs_run(root / "cs_s0", 0, 0.0, 0.85, 0.1)
    _imp_run(root / "imp_s0", 0, [0.86, 0.87, 0.865], [1.0, 1.0, 1.0])
    _structured(root / "r_cs", 0, root / "cs_s0", "cs", 0.80, 0.3)
    _write(root / "lenet_cs", {"model": "lenet_300_100", "dataset": "synthetic", "method": "cs", "mode": "ticket",
                               "seed": 0, "s0": 0.0, "density": 0.1, "test_accuracy": 0.9, "epochs": 99.0},
           {"data": DATA, "model": MODEL, "training": RECIPE, "kind": "search-cs", "seed": 0, "cs": {"s0": 0.0}})
    rows = summarize(find_results([root]))
    by_data = report.epochs_for_tickets_by_data(rows)
    assert set(by_data) == {("conv4", "synthetic"), ("lenet_300_100", "synthetic")}
    assert set(by_data[("conv4", "synthetic")]) == {"cs ticket", "imp"}
    assert "refill+" not in " ".join(epochs_for_tickets(rows))
    figs = _capture_figures(monkeypatch)
    report.plot_epochs_vs_tickets(by_data, tmp_path / "e.png")
    (fig,) = figs
    assert len(fig.axes) == 2
    for ax in fig.axes:
        legend, box = ax.get_legend().get_window_extent(), ax.get_window_extent()
        assert legend.x0 >= box.x1  # beside the panel: covers neither curves nor the y label


def test_std_is_the_sample_std_and_none_for_one_seed(tmp_path, capsys):
    root = tmp_path / "runs"
    _cs_run(root / "cs_s0", 0, 0.0, 0.85, 0.1, dense_test_accuracy=0.84)
    rep = write_report([root], tmp_path / "out")
    (row,) = rep.rows
    assert row["test_accuracy_std"] is None and row["dense_test_accuracy_std"] is None
    text = rep.text()
    assert "85.00 ± –" in text and "1 seed " in text and "1 seeds" not in text and "n-1" in text
    assert "0.00" not in text.split("sparsest")[0].split("\n", 2)[2]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "(mean ± std, n-1)" in md and "sample standard deviation" in md
    with open(tmp_path / "out" / "report.csv", newline="") as f:
        (line,) = list(csv.DictReader(f))
    assert line["test_accuracy_std_n-1"] == "" and float(line["test_accuracy"]) == pytest.approx(0.85)


def test_layer_density_plot_fits_and_log_axis_has_labels_between_decades(tmp_path, monkeypatch):
    ticket = tmp_path / ("search-cs_resnet20_cifar10_s0_" + "0123456789" * 4)
    ticket.mkdir()
    _mask_json(ticket, (10, 5))
    figs = _capture_figures(monkeypatch)
    report.plot_layer_density(ticket, tmp_path / "layers.png")
    (fig,) = figs
    page = fig.bbox
    for text in (fig.axes[0].title, fig.axes[0].yaxis.label):
        box = text.get_window_extent()
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, text.get_text()
    with pytest.raises(ConfigError, match="nowhere does not exist"):
        report.plot_layer_density(tmp_path / "nowhere", tmp_path / "x.png")
    with pytest.raises(ConfigError, match="nowhere does not exist"):
        write_report([ticket.parent], tmp_path / "out", layers=tmp_path / "nowhere")

    import lottery.io

    saved = []
    monkeypatch.setattr(lottery.io, "save_figure", lambda fig, path, **kw: saved.append(fig))
    points = [{"method": "cs", "density": d, "test_accuracy": 0.9} for d in (0.8, 0.3, 0.04, 0.015)]
    report.plot_accuracy_vs_density(points, tmp_path / "a.png")
    ax = saved[0].axes[0]
    saved[0].canvas.draw()
    lo, hi = sorted(ax.get_xlim())
    labels = {t.get_text() for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi and t.get_text()}
    assert {"2", "5", "20", "50"} <= labels


def test_cs_rounds_move_a_ticket_along_the_density_axis_not_onto_another_curve():
    """Each CS round prunes further, so tickets of 1, 2 and 3 rounds are points of one CS curve."""
    from lottery.report import _series_names

    rows = [{"method": "cs ticket", "params": {"s0": 0.0, "rounds": n}} for n in (1, 2, 3)]
    rows.append({"method": "cs ticket", "params": {"s0": 0.0, "rounds": 3, "penalty": "mean"}})
    names = _series_names(rows)
    assert names[0] == names[1] == names[2] and names[3] != names[0]


def test_flops_columns_and_plot_come_from_results_json(tmp_path):
    root = tmp_path / "runs"
    common = {"model": "lenet_300_100", "dataset": "synthetic", "kind": "search-cs", "method": "cs", "mode": "ticket",
              "rounds": 1, "lam": 1e-8}
    for seed, (flops, acc) in enumerate([(1_000_000, 0.9), (3_000_000, 0.92)]):
        for s0, scale in ((0.05, 1), (-0.05, 0.5)):
            _write(root / f"cs_{s0}_{seed}", {**common, "seed": seed, "s0": s0, "density": 0.2 * scale,
                                              "test_accuracy": acc, "flops_dense": 8_000_000,
                                              "flops_sparse": flops * scale, "theoretical_speedup": 8_000_000 / (flops * scale)})
    rep = write_report([root], tmp_path / "report")
    row = next(r for r in rep.rows if r["params"]["s0"] == 0.05)
    assert row["flops_sparse"] == 2_000_000  # the mean over the seeds, from the files
    assert row["theoretical_speedup"] == pytest.approx((8 + 8 / 3) / 2)
    text = rep.text()
    assert "FLOPs/example" in text and "2M" in text and "speed-up (FLOPs)" in text
    with open(tmp_path / "report" / "report.csv", newline="") as f:
        csv_row = next(r for r in csv.DictReader(f) if "0.05" in r["setting"] and "-" not in r["setting"])
    assert float(csv_row["flops_sparse"]) == 2_000_000 and float(csv_row["flops_dense"]) == 8_000_000
    assert (tmp_path / "report" / "accuracy_vs_flops_lenet_300_100_synthetic.png").is_file()


def test_layer_plot_shows_the_flops_share_when_mask_json_has_it(tmp_path, monkeypatch):
    folder = tmp_path / "ticket"
    folder.mkdir()
    _mask_json(folder, (10, 5))
    report_json = json.loads((folder / "mask.json").read_text())
    report_json["layers"]["fc1.weight"]["flops_share"] = 0.75
    report_json["layers"]["fc2.weight"]["flops_share"] = 0.25
    (folder / "mask.json").write_text(json.dumps(report_json))
    labels = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.bar

    def spy(self, *args, **kwargs):
        labels.append((kwargs.get("label"), list(args[1])))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", spy)
    report.plot_layer_density(folder, tmp_path / "layers.png")
    assert labels[0] == ("density (% of the layer kept)", [10.0, 10.0])
    assert labels[1] == ("share of the dense network's FLOPs (%)", [75.0, 25.0])


def test_sparsest_matching_ticket_is_never_a_run_that_pruned_nothing():
    """A matching group at density 1 (CS whose mask kept every weight, a pruning rate of 0) pruned nothing:
    it is no ticket, so a sparser group that does not match leaves no sparsest matching ticket at all."""
    common = {"model": "m", "dataset": "d", "recipe": "r", "n_seeds": 1, "dense_test_accuracy": 0.9}
    rows = [{**common, "method": "cs ticket", "params": {"s0": 0.5}, "density": 1.0, "test_accuracy": 0.91,
             "matching": True},
            {**common, "method": "cs ticket", "params": {"s0": -0.1}, "density": 0.2, "test_accuracy": 0.5,
             "matching": False},
            {**common, "method": "imp", "params": {"level": 1}, "density": 1.0, "test_accuracy": 0.9,
             "matching": True},
            {**common, "method": "imp", "params": {"level": 2}, "density": 0.8, "test_accuracy": 0.9,
             "matching": True}]
    best = report.sparsest_matching(rows)
    assert [(r["method"], r["density"]) for r in best] == [("imp", 0.8)]


def _x_labels(monkeypatch, tmp_path, densities, **kw):
    """The x tick labels drawn in the accuracy plot of points at ``densities``: [(text, x0, x1)] in pixels."""
    import lottery.io

    def measure(fig):
        fig.canvas.draw()
        ax = fig.axes[0]
        lo, hi = sorted(ax.get_xlim())
        renderer = fig.canvas.get_renderer()
        return [(t.get_text(), *t.get_window_extent(renderer).intervalx) for t in ax.get_xticklabels()
                if t.get_text() and lo <= t.get_position()[0] <= hi]

    saved = []
    monkeypatch.setattr(lottery.io, "save_figure", lambda fig, path, **_: saved.append(measure(fig)))
    points = [{"method": "imp", "density": d, "test_accuracy": 0.9 - 0.01 * i} for i, d in enumerate(densities)]
    report.plot_accuracy_vs_density(points, tmp_path / "a.png", **kw)
    return saved[0]


def _no_overlap(labels) -> bool:
    spans = sorted((x0, x1) for _, x0, x1 in labels)
    return all(a1 < b0 for (_, a1), (b0, _) in zip(spans, spans[1:]))


def test_density_axis_labels_every_points_density(monkeypatch, tmp_path):
    """A 2-level IMP plot (densities 100, 80, 64 %) labels all three densities, not only "100"."""
    labels = _x_labels(monkeypatch, tmp_path, [1.0, 0.8, 0.64], dense_accuracy=0.9)
    assert {"100", "80", "64"} <= {text for text, _, _ in labels}
    assert _no_overlap(labels)


def test_density_axis_labels_never_overlap_and_thin_crowded_points(monkeypatch, tmp_path):
    """Points too close to label each (50, 49, 48 %) keep one label; the others all get theirs, and
    reference values (1, 2, 5 of a decade) fill the room left; no two labels overlap."""
    labels = _x_labels(monkeypatch, tmp_path, [0.5, 0.49, 0.48, 0.3, 0.1, 0.05, 0.011])
    texts = [text for text, _, _ in labels]
    assert {"50", "30", "10", "5", "1.1"} <= set(texts)
    assert not {"49", "48"} <= set(texts)
    assert _no_overlap(labels) and len(texts) == len(set(texts))
