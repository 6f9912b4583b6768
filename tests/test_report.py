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
    from lottery.cli import OneLineErrorParser, _common_flags
    from lottery.cli_sweep import register

    parser = OneLineErrorParser(prog="lottery")
    register(parser.add_subparsers(dest="command", parser_class=OneLineErrorParser), _common_flags)
    args = parser.parse_args(["report", str(runs), "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "test acc % (mean ± std)" in out and "sparsest matching ticket per method" in out
    assert (tmp_path / "out" / "report.md").is_file()
    with pytest.raises(ConfigError, match="neither a run folder nor a results.json"):
        write_report([tmp_path / "missing"], tmp_path / "x")


def test_single_run_plot_still_works(runs, tmp_path):
    results = json.loads((runs / "search-cs_0.05_s0" / "results.json").read_text())
    results["run_dir"] = str(tmp_path / "one")
    path = report.plot_run_summary(runs, results)
    assert path.is_file() and path.with_suffix(".svg").is_file()
