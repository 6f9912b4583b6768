"""The decisions of benchmarks/resnet_fashion.py that RESULTS.md reports as measured: which rewind point k
IMP-R and CS use (chosen from the dense network's instability) and the verdicts on the papers' claims.
They run on small hand-made run folders and series, so a wrong verdict fails here, not in a results table
written after a day of training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark_module import benchmark_module
from lottery.presets import get_preset


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("resnet_fashion.py") as module:
        yield module


def _stability_run(out: Path, seed: int, instability: dict[str, float], points=("0it", "100it", "1ep"),
                   training_steps: str | None = None) -> None:
    """A dense instability run folder as lottery writes it: hparams.json and one k_*/result.json per point
    that has finished."""
    preset = get_preset("fashion_resnet20")
    training = preset.training.to_dict()
    if training_steps is not None:
        training["training_steps"] = training_steps
    folder = out / f"stability_resnet20_fashion-mnist_s{seed}_{training_steps or 'x'}"
    folder.mkdir(parents=True)
    (folder / "hparams.json").write_text(json.dumps({
        "seed": seed, "data": preset.data.to_dict(), "model": preset.model.to_dict(), "training": training,
        "stability": {"mask": None, "rewind_points": list(points), "copy_seeds": [101 + seed, 201 + seed]}}))
    for k, value in instability.items():
        (folder / f"k_{k}").mkdir()
        (folder / f"k_{k}" / "result.json").write_text(json.dumps({"rewind": k, "instability": value}))


def test_k_is_the_earliest_point_stable_on_average_once_every_seed_has_it(bench, tmp_path):
    points = ("0it", "100it", "1ep")
    # seed 2's 100it point is not in yet: k cannot be chosen (1ep could still be the answer)
    _stability_run(tmp_path, 0, {"0it": 0.78, "100it": 0.01, "1ep": 0.005}, points)
    _stability_run(tmp_path, 1, {"0it": 0.80, "100it": 0.02, "1ep": 0.004}, points)
    _stability_run(tmp_path, 2, {"0it": 0.75}, points)
    k, why = bench.pick_rewind(tmp_path, (0, 1, 2), points)
    assert k is None and "100it" in why

    # once it is in, the mean over seeds decides: (0.01 + 0.02 + 0.04) / 3 > 0.02, so 100it is not stable
    (tmp_path / "stability_resnet20_fashion-mnist_s2_x" / "k_100it").mkdir()
    (tmp_path / "stability_resnet20_fashion-mnist_s2_x" / "k_100it" / "result.json").write_text(
        json.dumps({"rewind": "100it", "instability": 0.04}))
    k, why = bench.pick_rewind(tmp_path, (0, 1, 2), points)
    assert k is None and "1ep" in why  # seed 2's 1ep is still missing
    (tmp_path / "stability_resnet20_fashion-mnist_s2_x" / "k_1ep").mkdir()
    (tmp_path / "stability_resnet20_fashion-mnist_s2_x" / "k_1ep" / "result.json").write_text(
        json.dumps({"rewind": "1ep", "instability": 0.006}))
    k, why = bench.pick_rewind(tmp_path, (0, 1, 2), points)
    assert k == "1ep" and "2.33" in why  # 100it's mean, in points, is named as the reason it was passed over


def test_k_is_chosen_before_later_points_finish_and_other_recipes_are_ignored(bench, tmp_path):
    points = ("0it", "100it", "1ep")
    for seed in (0, 1, 2):
        _stability_run(tmp_path, seed, {"0it": 0.7, "100it": 0.01}, points)  # 1ep still running everywhere
    # a run of another recipe (8 epochs) with a different verdict in the same folder must not count
    _stability_run(tmp_path, 0, {"0it": 0.001, "100it": 0.9}, points, training_steps="8ep")
    table = bench.dense_instability(tmp_path, (0, 1, 2), points)
    assert table == {"0it": [0.7, 0.7, 0.7], "100it": [0.01, 0.01, 0.01], "1ep": []}
    assert bench.pick_rewind(tmp_path, (0, 1, 2), points)[0] == "100it"


def _rows(*accuracies: float) -> list[dict]:
    return [{"test_accuracy": a} for a in accuracies]


def test_claims_verdicts(bench, capsys):
    dense = 0.92
    series = {
        "IMP k=0": {0.8: _rows(0.92, 0.921, 0.919), 0.64: _rows(0.915, 0.914, 0.916), 0.512: _rows(0.90, 0.90, 0.90)},
        "IMP-R k=1ep": {0.8: _rows(0.92, 0.92, 0.92), 0.64: _rows(0.92, 0.919, 0.921),
                        0.512: _rows(0.91, 0.91, 0.91),
                        0.4096: _rows(0.95, 0.95)},  # only 2 of 3 seeds: must not count as matching
        "CS": {0.64: _rows(0.93, 0.93, 0.93), 0.32: _rows(0.921, 0.92, 0.919), 0.16: _rows(0.80, 0.80, 0.80)},
        # the paper's mask recipe is judged on its own: behind IMP-R at 0.512, matching nowhere
        bench.CS_PAPER: {0.512: _rows(0.90, 0.90, 0.91)},
    }
    instability = {"0it": [0.8, 0.7, 0.75], "100it": [0.05, 0.04, 0.06], "1ep": [0.01, 0.01, 0.01]}
    bench.claims(series, instability, dense, "1ep", 3)
    out = capsys.readouterr().out
    # (a): IMP k=0 leaves the matching band at 0.64 (91.5 < 91.8), IMP-R only at 0.512
    assert "IMP k=0 first falls below matching at density 0.64, IMP-R at 0.512: holds" in out
    # (b): falls with k; first stable point 1ep; IMP-R's sparsest matching is 0.64 (0.4096 has 2 seeds)
    assert "never rises with k; first below 2: 1ep" in out
    assert "sparsest matching: IMP-R (k=1ep) 0.64, IMP k=0 0.8" in out
    # (c): CS matches down to 0.32, half of 0.64 -> yes; at the one shared density, 0.64, CS is ahead
    assert "(c) CS: sparsest matching: CS 0.32, IMP-R 0.64 (at most half of IMP-R: yes)" in out
    assert "CS - IMP-R at shared densities, points: 0.6400: +1.00" in out
    assert "0.6400: +1.00 (Welch t +17.3) (at least as accurate at every one: yes)" in out
    paper = next(line for line in out.splitlines() if line.startswith(f"(c) {bench.CS_PAPER}"))
    assert "sparsest matching: CS (paper's mask recipe) none, IMP-R 0.64 (at most half of IMP-R: -)" in paper
    assert "0.5120: -0.67" in paper and paper.endswith("(at least as accurate at every one: no)")


def test_imp_c_beside_imp_r_in_the_report(bench, capsys):
    """IMP-C is no claim of the papers, but RESULTS.md compares it with IMP-R: its differences with Welch's t at
    the densities both have for every seed, and where every IMP-C seed is below every IMP-R seed."""
    series = {
        "IMP k=0": {0.8: _rows(0.92, 0.92, 0.92)},
        "IMP-R k=1ep": {0.8: _rows(0.92, 0.921, 0.919), 0.64: _rows(0.92, 0.919, 0.921), 0.512: _rows(0.91, 0.91, 0.91)},
        "IMP-C k=1ep": {0.8: _rows(0.925, 0.92, 0.915), 0.64: _rows(0.90, 0.905, 0.91), 0.512: _rows(0.9, 0.9)},
    }
    for continued, row in zip((0.93, 0.92, 0.91), series["IMP-C k=1ep"][0.64]):
        row["continued_test_accuracy"] = continued
    bench.claims(series, {}, 0.92, "1ep", 3)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("IMP-C (not a claim)"))
    assert "sparsest matching 0.8;" in line and "0.5120" not in line  # 0.512 has 2 IMP-C seeds
    assert "0.8000: +0.00 (Welch t +0.0);" in line
    assert "0.6400: -1.50 (Welch t -5.1) every seed below;" in line
    assert line.endswith("the network IMP-C keeps training, test %: 0.6400: 92.00")  # 0.8 has none recorded


def test_claims_that_do_not_hold_say_so(bench, capsys):
    dense = 0.92
    series = {
        "IMP k=0": {0.8: _rows(0.92, 0.92, 0.92), 0.64: _rows(0.92, 0.92, 0.92)},
        "IMP-R k=1ep": {0.8: _rows(0.92, 0.92, 0.92), 0.64: _rows(0.90, 0.90, 0.90)},
        "CS": {0.64: _rows(0.89, 0.89, 0.89), 0.8: _rows(0.921, 0.92, 0.92)},
    }
    instability = {"0it": [0.1, 0.1, 0.1], "100it": [0.2, 0.2, 0.2]}
    bench.claims(series, instability, dense, "1ep", 3)
    out = capsys.readouterr().out
    assert "IMP k=0 first falls below matching at density none of them, IMP-R at 0.64: does not hold" in out
    assert "not monotone in k; first below 2: None" in out
    assert "(at most half of IMP-R: no)" in out and "(at least as accurate at every one: no)" in out
    assert bench.CS_PAPER not in out  # no paper's-recipe ticket, no line for it


def test_parts_plan_a_subset_and_drop_waits_on_parts_left_out(bench, tmp_path):
    every = bench.plan(tmp_path, (0,), "1ep")
    assert {j.part for j in every} == set(bench.PARTS) - {"controls"}  # controls wait for IMP-R's folder
    ticket = next(j for j in every if j.name == "instability CS 0.1678 s0")
    assert set(ticket.needs) == {"IMP-R k=1ep s0", "CS 0.1678 s0", "stability s0"}

    only = bench.plan(tmp_path, (0,), "1ep", parts=("cs", "tickets"))
    assert {j.part for j in only} == {"cs", "tickets"}
    ticket = next(j for j in only if j.name == "instability CS 0.1678 s0")
    assert ticket.needs == ("CS 0.1678 s0",)  # IMP-R and the dense run are read from their folders as they are
    # before k is chosen, only the parts that do not need it can be planned
    assert [j.name for j in bench.plan(tmp_path, (0, 1), None, parts=("stability",))] == ["stability s0", "stability s1"]


def test_ticket_instability_at_k_starts_from_each_tickets_own_rewind_state(bench, tmp_path, monkeypatch):
    """At k every ticket is analysed from its own rewind weights (a CS search's first round, IMP-R's level 0);
    k = 0 from the dense run (the initial weights are the seed's); CS's first runs keep their points."""
    jobs = {j.name: j for j in bench.plan(tmp_path, (0,), "1ep", parts=("tickets",))}
    want = {  # name: (points, own start)
        "instability IMP-R 0.1678 own s0": (("1ep",), True), "instability CS 0.1678 own s0": (("1ep",), True),
        "instability IMP-R 0.0687 own s0": (("1ep",), True), "instability CS 0.0687 own s0": (("1ep",), True),
        "instability IMP-R 0.1678 s0": (("0it",), False), "instability CS 0.1678 s0": (("0it", "1ep"), False),
        "instability CS 0.0687 s0": (("1ep",), False),
    }
    assert set(jobs) == set(want)
    for name, (points, own) in want.items():
        args = jobs[name].args
        assert args[5] == points and (args[8] if len(args) > 8 else False) == own, name

    cs_folder, imp_folder = tmp_path / "search-cs_x", tmp_path / "search-imp_y"
    masks = {"CS": cs_folder / "mask.safetensors", "IMP-R": imp_folder / "level_8" / "mask.safetensors"}
    monkeypatch.setattr(bench.ticket_bench, "find_masks", lambda *a, **k: masks)
    seen = []
    monkeypatch.setattr(bench, "stability_job", lambda seed, out, points, recipe, mask, start_state: seen.append(
        (mask, start_state)))
    for ticket in ("CS", "IMP-R"):
        bench.ticket_stability_job(0, ticket, 0.1678, 8, "1ep", ("1ep",), str(tmp_path), own_start=True)
    assert seen == [(str(masks["CS"]), str(cs_folder / "rewind.safetensors")),
                    (str(masks["IMP-R"]), str(imp_folder / "rewind.safetensors"))]
    with pytest.raises(ValueError, match="alone"):
        bench.ticket_stability_job(0, "CS", 0.1678, 8, "1ep", ("0it", "1ep"), str(tmp_path), own_start=True)


def test_a_width_is_part_of_the_recipe_and_reaches_the_command_line(bench, tmp_path):
    import argparse

    from lottery.cli.common import base_groups, common_flags

    full = bench.Recipe(width=1.0, device="cpu")
    data, model, training = full.hparams()
    assert model.width == 1.0 and bench.DEFAULT.hparams()[1].width == 0.25
    parser = argparse.ArgumentParser()
    common_flags(parser)
    _, cli_data, cli_model, cli_training = base_groups(parser.parse_args(full.cli_flags()))
    assert (cli_data, cli_model, cli_training) == (data, model, training)  # CS tickets train what IMP trains

    # a run folder of one width is never read as the other's
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "hparams.json").write_text(json.dumps(
        {"data": data.to_dict(), "model": model.to_dict(), "training": training.to_dict()}))
    assert bench.same_recipe(folder, full) and not bench.same_recipe(folder, bench.DEFAULT)


def _hparams(recipe, **extra) -> str:
    data, model, training = recipe.hparams()
    return json.dumps({"data": data.to_dict(), "model": model.to_dict(), "training": training.to_dict(), **extra})


def test_cs_checks_and_where_each_method_keeps_its_weights(bench, tmp_path, capsys):
    """The report's evidence for claim (c): each CS search's last round (converged or not, soft against hard
    accuracy) and the per-layer densities of CS, IMP-R and IMP-C at one density, read from their run folders.
    Runs of another k or another recipe must not be read; CS with the paper's mask recipe, in its own folder,
    is a column of its own."""
    recipe = bench.DEFAULT
    out = tmp_path / "resnet_fashion"
    out.mkdir()
    level = 12  # nominal density 0.8 ** 12 = 0.0687
    for seed, (layer_a, converged) in enumerate(((0.5, True), (0.25, False))):
        cs = out / f"search-cs_resnet20_fashion-mnist_s{seed}_x"
        cs.mkdir()
        (cs / "hparams.json").write_text(_hparams(recipe))
        (cs / "results.json").write_text(json.dumps({
            "seed": seed, "mode": "ticket", "target_density": 0.0687, "density": 0.06871, "rewind": "1ep",
            "mask_converged": converged, "test_accuracy": 0.9 - seed / 100,
            "convergence": [{"soft_val_accuracy": 0.5}, {"soft_val_accuracy": 0.88, "hard_val_accuracy": 0.8 + seed / 10,
                                                         "undecided": 0.001 * seed, "flips": 7}]}))
        (cs / "mask.json").write_text(json.dumps({"layers": {"a": {"density": layer_a}, "b": {"density": 0.05}}}))
        imp = out / f"search-imp_resnet20_fashion-mnist_s{seed}_x"
        (imp / f"level_{level}").mkdir(parents=True)
        (imp / "hparams.json").write_text(_hparams(recipe, seed=seed, imp={"rewind": "1ep"}))
        (imp / f"level_{level}" / "mask.json").write_text(
            json.dumps({"layers": {"a": {"density": 0.1}, "b": {"density": (0.06, 0.07)[seed]}}}))
    imp_c = out / "search-imp-c_resnet20_fashion-mnist_s1_x"  # IMP-C: one seed has reached the level
    (imp_c / f"level_{level}").mkdir(parents=True)
    (imp_c / "hparams.json").write_text(_hparams(recipe, seed=1, imp={"rewind": "1ep"}))
    (imp_c / f"level_{level}" / "mask.json").write_text(
        json.dumps({"layers": {"a": {"density": 0.2}, "b": {"density": 0.03}}}))
    other_k = out / "search-cs_resnet20_fashion-mnist_s0_otherk"
    other_k.mkdir()
    (other_k / "hparams.json").write_text(_hparams(recipe))
    (other_k / "results.json").write_text(json.dumps({"seed": 0, "mode": "ticket", "target_density": 0.0687,
                                                      "density": 0.0687, "rewind": "0it", "test_accuracy": 0.1}))
    other_recipe = out / "search-cs_resnet20_fashion-mnist_s1_w1"
    other_recipe.mkdir()
    (other_recipe / "hparams.json").write_text(_hparams(bench.Recipe(width=1.0)))
    (other_recipe / "results.json").write_text(json.dumps({"seed": 1, "mode": "ticket", "target_density": 0.0687,
                                                           "density": 0.0687, "rewind": "1ep", "test_accuracy": 0.1}))

    paper = bench.paper_out(out) / "search-cs_resnet20_fashion-mnist_s0_p"
    paper.mkdir(parents=True)
    (paper / "hparams.json").write_text(_hparams(recipe, cs={"mask_optimizer": "sgd", "temperature_schedule": "epoch",
                                                             "beta_final": 200.0}))
    (paper / "results.json").write_text(json.dumps({
        "seed": 0, "mode": "ticket", "target_density": 0.0687, "density": 0.0687, "rewind": "1ep",
        "mask_converged": False, "test_accuracy": 0.905, "convergence": [{"soft_val_accuracy": 0.9,
                                                                          "hard_val_accuracy": 0.8}]}))
    (paper / "mask.json").write_text(json.dumps({"layers": {"a": {"density": 0.4}, "b": {"density": 0.06}}}))
    not_paper = bench.paper_out(out) / "search-cs_resnet20_fashion-mnist_s1_adam"  # the default's, misplaced
    not_paper.mkdir()
    (not_paper / "hparams.json").write_text(_hparams(recipe, cs={"mask_optimizer": "adam"}))
    (not_paper / "results.json").write_text(json.dumps({"seed": 1, "mode": "ticket", "target_density": 0.0687,
                                                        "density": 0.0687, "rewind": "1ep", "test_accuracy": 0.1}))

    checks = bench.cs_checks(out, (0, 1, 2), "1ep")
    assert [(c["series"], c["seed"], c["test"]) for c in checks if c["series"] != "CS"] == [(bench.CS_PAPER, 0, 0.905)]
    checks = [c for c in checks if c["series"] == "CS"]
    assert [(c["seed"], c["converged"], c["hard"], c["flips"], c["test"]) for c in checks] == [
        (0, True, 0.8, 7, 0.9), (1, False, 0.9, 7, 0.89)]  # the last round's figures; other k / width left out
    layers = bench.layer_densities(out, (0, 1, 2), "1ep", 0.0687)
    assert layers == {"a": {"CS": [0.5, 0.25], bench.CS_PAPER: [0.4], "IMP-R": [0.1, 0.1], "IMP-C": [0.2]},
                      "b": {"CS": [0.05, 0.05], bench.CS_PAPER: [0.06], "IMP-R": [0.06, 0.07], "IMP-C": [0.03]}}
    assert bench.layer_densities(out, (0, 1, 2), "1ep", 0.0343) == {}  # no CS ticket, no IMP-R level there

    bench.report(out, (0, 1, 2), "1ep", None)
    out = capsys.readouterr().out
    assert "| CS | 0.0687 | 1 | 0.0687 | False | 88.00 / 90.00 | 0.100 | 7 | 89.00 |" in out
    assert f"| {bench.CS_PAPER} | 0.0687 | 0 | 0.0687 | False | 90.00 / 80.00 | - | - | 90.50 |" in out
    assert f"| layer | CS | {bench.CS_PAPER} | IMP-R k=1ep | IMP-C k=1ep |" in out
    assert "| a | 37.5 (2) | 40.0 (1) | 10.0 (2) | 20.0 (1) |" in out
    assert "| b | 5.0 (2) | 6.0 (1) | 6.5 (2) | 3.0 (1) |" in out
    assert f"| 0.0687 | 89.50 ± 0.71 (2) | 90.50 ± 0.00 (1) |" in out  # the accuracy table has both CS columns


def test_paper_recipe_tickets_reuse_the_dense_network_in_a_folder_of_their_own(bench, tmp_path, monkeypatch):
    """A CS-paper job copies its seed's finished dense run into the paper's folder (never a half copy, never
    the lock) and runs `lottery search cs` there with the paper's flags; the sparse densities go first."""
    recipe = bench.DEFAULT
    out = tmp_path / "resnet_fashion"
    dense = out / "train_resnet20_fashion-mnist_s2_d"
    dense.mkdir(parents=True)
    (dense / "hparams.json").write_text(_hparams(recipe))
    (dense / "results.json").write_text(json.dumps({"seed": 2, "test_accuracy": 0.92}))
    (dense / ".lock").write_text("")
    (dense / "model.safetensors").write_bytes(b"weights")
    stale = bench.paper_out(out) / f".{dense.name}.copy.tmp"  # a copy cut off by a kill
    stale.mkdir(parents=True)
    (stale / "junk").write_text("")
    calls = []
    monkeypatch.setattr(bench, "cs_job", lambda *args: calls.append(args) or {})
    bench.cs_paper_job(2, 0.0687, "1ep", str(out), recipe)
    copied = bench.paper_out(out) / dense.name
    assert (copied / "model.safetensors").read_bytes() == b"weights" and not (copied / ".lock").exists()
    assert not stale.exists() and not (copied / "junk").exists()
    assert calls == [(2, 0.0687, "1ep", str(bench.paper_out(out)), recipe, bench.CS_PAPER_FLAGS)]
    assert bench.CS_PAPER_FLAGS == ("--mask-optimizer", "sgd", "--temperature-schedule", "epoch", "--beta-final", "200")

    jobs = sorted((j for j in bench.plan(out, (0, 1), "1ep") if j.part in ("cs", "cs_paper")),
                  key=lambda j: (j.priority, j.name))
    assert [j.name for j in jobs[:4]] == ["CS-paper 0.0687 s0", "CS-paper 0.0687 s1", "CS-paper 0.0859 s0",
                                          "CS-paper 0.0859 s1"]


def test_dense_is_each_seeds_dense_run_and_imp_level_0_only_stands_in(bench, tmp_path, capsys):
    """The matching line is drawn from each seed's dense run (what the tickets are compared with); IMP k = 0's
    level 0, the same recipe trained once more, stands in only for a seed without one, and is shown apart."""
    recipe = bench.DEFAULT
    for seed, dense_accuracy in ((0, 0.91), (1, None)):
        if dense_accuracy is not None:
            dense = tmp_path / f"train_resnet20_fashion-mnist_s{seed}_d"
            dense.mkdir()
            (dense / "hparams.json").write_text(_hparams(recipe))
            (dense / "results.json").write_text(json.dumps({"seed": seed, "test_accuracy": dense_accuracy}))
        imp = tmp_path / f"search-imp_resnet20_fashion-mnist_s{seed}_k0"
        (imp / "level_0").mkdir(parents=True)
        (imp / "hparams.json").write_text(_hparams(recipe, seed=seed, imp={"rewind": "0it"}))
        (imp / "level_0" / "results.json").write_text(json.dumps({"level": 0, "test_accuracy": 0.93 - seed / 100}))
    series = bench.collect(tmp_path, (0, 1), "1ep")["series"]
    assert [r["test_accuracy"] for r in series["dense"][1.0]] == [0.91, 0.92]
    assert [r["test_accuracy"] for r in series["IMP k=0 level 0"][1.0]] == [0.93, 0.92]
    bench.report(tmp_path, (0, 1), "1ep", None)
    out = capsys.readouterr().out
    assert "dense (each seed's dense run): 91.50 ± 0.71 % over 2 seeds (91.00 / 92.00); trained again as IMP k=0's " \
           "level 0: 93.00 / 92.00" in out


def test_ticket_instability_rows_carry_the_copies_end_accuracy_and_distance(bench, tmp_path):
    """The report's ticket table names where each ticket's copies started, what they ended at and how far apart
    they ended; a ticket of another rewind point (IMP at k = 0) stays out of it."""
    preset = get_preset("fashion_resnet20")
    recipe_hp = {"data": preset.data.to_dict(), "model": preset.model.to_dict(), "training": preset.training.to_dict()}

    def search(name: str, rewind: str) -> Path:
        folder = tmp_path / name
        (folder / "level_12").mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"method": "imp", "rewind": rewind, "seed": 0}))
        return folder / "level_12" / "mask.safetensors"

    def ticket(name: str, mask: Path, instability: float, errors: tuple, l2: float, start_state: str | None) -> None:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "hparams.json").write_text(json.dumps({"seed": 0, **recipe_hp}))
        row = {"rewind": "1ep", "instability": instability, "error_a": errors[0], "error_b": errors[1],
               "l2_between": l2}
        (folder / "results.json").write_text(json.dumps({
            "seed": 0, "mask": str(mask), "mask_density": 0.06864, "start_state": start_state, "rows": [row]}))

    ticket("stability_resnet20_fashion-mnist_s0_a", search("search-imp_resnet20_fashion-mnist_s0_r", "1ep"),
           0.0049, (0.0956, 0.0979), 5.86, "rewind.safetensors")
    ticket("stability_resnet20_fashion-mnist_s0_b", search("search-imp_resnet20_fashion-mnist_s0_z", "0it"),
           0.5, (0.2, 0.2), 20.0, None)
    data = bench.collect(tmp_path, (0,), "1ep")
    key = ("IMP-R", 0.0686, "1ep", "own")
    assert list(data["tickets"]) == [key]
    assert data["tickets"][key] == [pytest.approx(0.0049)]
    (row,) = data["ticket_details"][key]
    assert row["ends"] == [pytest.approx(0.9044), pytest.approx(0.9021)] and row["l2_between"] == 5.86


def test_imp_c_overlap_is_the_share_of_imp_r_kept_weights_imp_c_keeps(bench, tmp_path, capsys):
    """The report's comparison of IMP-C's masks with IMP-R's: per seed and level, of the weights IMP-R keeps,
    the share IMP-C keeps too; level 0 (nothing pruned) and IMP-R runs of another k are not read."""
    import torch

    from lottery.io import save_tensors

    recipe = bench.DEFAULT

    def run(kind: str, rewind: str, masks: dict[int, list[int]]) -> None:
        folder = tmp_path / f"{kind}_resnet20_fashion-mnist_s0_{rewind}"
        folder.mkdir()
        (folder / "hparams.json").write_text(_hparams(recipe, seed=0, imp={"rewind": rewind}))
        for level, kept in masks.items():
            (folder / f"level_{level}").mkdir()
            save_tensors(folder / f"level_{level}" / "mask.safetensors", {"w": torch.tensor(kept, dtype=torch.bool)})

    run("search-imp", "1ep", {0: [1, 1, 1, 1], 1: [1, 1, 1, 0], 2: [1, 1, 0, 0]})
    run("search-imp", "0it", {1: [0, 0, 0, 1], 2: [0, 0, 1, 1]})  # IMP at k = 0: another run, never compared
    run("search-imp-c", "1ep", {0: [1, 1, 1, 1], 1: [1, 1, 1, 0], 2: [1, 0, 1, 0], 3: [1, 0, 0, 0]})
    assert bench.imp_c_overlap(tmp_path, (0, 1), "1ep") == {1: {0: 1.0}, 2: {0: 0.5}}
    bench.report(tmp_path, (0,), "1ep", None)
    out = capsys.readouterr().out
    assert "| 2 | 0.6400 | s0 50.0 |" in out and "| 1 | 0.8000 | s0 100.0 |" in out


def test_imp_c_layer_gaps_follow_the_layers_that_part_most_at_the_sparsest_level(bench, tmp_path):
    """The report's table of where IMP-C's and IMP-R's masks part: the layers are chosen at the sparsest level
    both have for every seed, and every such level gets their means; a level one seed lacks is left out."""
    recipe = bench.DEFAULT
    out = tmp_path / "resnet_fashion"
    densities = {  # (kind, level): {layer: density}, the same for both seeds
        ("search-imp", 1): {"a": 0.8, "b": 0.8, "c": 0.8}, ("search-imp-c", 1): {"a": 0.8, "b": 0.7, "c": 0.9},
        ("search-imp", 2): {"a": 0.6, "b": 0.6, "c": 0.6}, ("search-imp-c", 2): {"a": 0.3, "b": 0.62, "c": 0.7},
    }
    for seed in (0, 1):
        for kind in ("search-imp", "search-imp-c"):
            folder = out / f"{kind}_resnet20_fashion-mnist_s{seed}_x"
            folder.mkdir(parents=True)
            (folder / "hparams.json").write_text(_hparams(recipe, seed=seed, imp={"rewind": "1ep"}))
            for level in (1, 2, 3):
                if level == 3 and (kind, seed) == ("search-imp-c", 1):
                    continue  # seed 1's IMP-C has not finished level 3
                layers = densities.get((kind, level), {"a": 0.5, "b": 0.5, "c": 0.5})
                (folder / f"level_{level}").mkdir()
                (folder / f"level_{level}" / "mask.json").write_text(
                    json.dumps({"layers": {name: {"density": d} for name, d in layers.items()}}))
    gaps = bench.imp_c_layer_gaps(out, (0, 1), "1ep", [1, 2, 3], recipe, top=2)
    assert list(gaps) == [1, 2]  # level 3 lacks a seed of IMP-C
    assert gaps[2] == {"a": (0.6, 0.3), "c": (0.6, 0.7)}  # the two largest gaps at level 2; b (0.02) left out
    assert gaps[1] == {"a": (0.8, 0.8), "c": (0.8, 0.9)}
