"""Stacked IMP replicates (issue 23): each member of a stack writes the run folder of the unstacked IMP run of
its hparams, with the same loss trajectory and the same masks at every level."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from lottery.experiment import RunOptions
from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
from lottery.io import load_tensors, read_json
from lottery.methods.imp import IMPHparams, LRRHparams
from lottery.pipelines.imp import IMPJob, LRRJob, run_imp
from lottery.pipelines.imp_stacked import imp_stack_key, imp_stack_refusal, run_imp_stacked

DATA = DataHparams(dataset="synthetic", synthetic_shape=(1, 8, 8), synthetic_train_size=256, synthetic_test_size=64,
                   val_size=64)
# 6 iterations per epoch; the members share the data order (data_order_seed) and differ in their seed.
TRAINING = TrainingHparams(training_steps="2ep", batch_size=32, momentum=0.9, lr=0.05, weight_decay=1e-4,
                           eval_every="4it", data_order_seed=5)
IMP = IMPHparams(levels=2, rate=0.2, rewind="2it")
MODEL = ModelHparams(model="lenet_300_100")
SEEDS = (0, 1)


def _jobs(imp: IMPHparams = IMP, training: TrainingHparams = TRAINING) -> list[IMPJob]:
    return [IMPJob(DATA, MODEL, training, imp, seed=s) for s in SEEDS]


def _options(out: Path, lines: list[str] | None = None) -> RunOptions:
    return RunOptions(out=out, progress=False, log=(lines.append if lines is not None else lambda line: None))


def _metrics(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to OpenMP spinning on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two replicates stacked and alone (module scope: the tests below share them)."""
    tmp = tmp_path_factory.mktemp("imp")
    lines: list[str] = []
    stacked = run_imp_stacked(_jobs(), _options(tmp / "stacked", lines), raise_errors=True)
    alone = [run_imp(j, _options(tmp / "alone")) for j in _jobs()]
    return stacked, alone, lines


def _assert_same_masks(sf: Path, af: Path, level: int) -> None:
    """The masks of ``level`` equal, but for weights whose magnitudes tie with the pruning threshold
    within rounding (the stacked and unstacked weights differ by rounding)."""
    ms = {n: m.bool() for n, m in load_tensors(sf / f"level_{level}" / "mask.safetensors").items()}
    ma = {n: m.bool() for n, m in load_tensors(af / f"level_{level}" / "mask.safetensors").items()}
    assert ms.keys() == ma.keys()
    assert sum(int(m.sum()) for m in ms.values()) == sum(int(m.sum()) for m in ma.values())
    source = load_tensors(af / f"level_{level - 1}" / "model.safetensors")
    kept = torch.cat([source[n].abs()[ma[n]] for n in ma])
    threshold = float(kept.min())  # the smallest magnitude the unstacked run kept (global scope)
    for name in ma:
        differ = ms[name] != ma[name]
        near = (source[name].abs() - threshold).abs() <= 1e-5 * threshold
        assert not (differ & ~near).any(), (level, name, int(differ.sum()))


def test_a_stacked_imp_replicate_equals_its_unstacked_run(runs):
    stacked, alone, lines = runs
    assert any(line.startswith("stack: 2 IMP searches as one network; they share the data order (seed 5)")
               for line in lines), lines
    densities = []
    for s, a in zip(stacked, alone):
        sf, af = Path(s["run_dir"]), Path(a["run_dir"])
        assert sf.name == af.name and (sf / "hparams.json").read_text() == (af / "hparams.json").read_text()
        assert s["stack"] == {"size": 2, "wall_seconds": s["stack"]["wall_seconds"], "data_order": 5}
        # The loss trajectory of every level to 1e-5, row by row, with the same columns.
        ms, ma = _metrics(sf), _metrics(af)
        assert list(ms[0].keys()) == list(ma[0].keys()) and len(ms) == len(ma) >= 9
        assert {r["stage"] for r in ms} == {"level_0", "level_1", "level_2"}
        for rs, ra in zip(ms, ma):
            assert (rs["stage"], rs["level"], rs["step"]) == (ra["stage"], ra["level"], ra["step"])
            assert float(rs["train_loss"]) == pytest.approx(float(ra["train_loss"]), rel=1e-5), (rs["stage"], rs["step"])
        for level in (1, 2):
            _assert_same_masks(sf, af, level)
        # The rewind point and every level's weights, with the same keys in the same order.
        for rel in ("rewind.safetensors", "level_0/model.safetensors", "level_2/model.safetensors"):
            ws, wa = load_tensors(sf / rel), load_tensors(af / rel)
            assert list(ws.keys()) == list(wa.keys()), rel
            for key in wa:
                torch.testing.assert_close(ws[key], wa[key], rtol=1e-4, atol=1e-4)
        # The same results: the summary (but for the stack's record) and every level's.
        assert set(s) - {"stack"} == set(a)
        assert [set(r) for r in s["levels"]] == [set(r) for r in a["levels"]]
        for rs, ra in zip(s["levels"], a["levels"]):
            for key in ("level", "density", "kept_weights", "prunable_weights", "epochs", "flops_dense"):
                assert rs.get(key) == ra.get(key), key
            assert rs["test_accuracy"] == pytest.approx(ra["test_accuracy"], abs=1.5 / 64)
            assert read_json(Path(rs["level_dir"]) / "results.json") == rs
        densities.append(load_tensors(sf / "level_2" / "mask.safetensors"))
    # The members really are different replicates: their masks differ.
    assert any((densities[0][n] != densities[1][n]).any() for n in densities[0])
    # Again: every member is reused, nothing trains.
    lines.clear()
    again = run_imp_stacked(_jobs(), _options(Path(stacked[0]["run_dir"]).parent, lines), raise_errors=True)
    assert [r["run_dir"] for r in again] == [r["run_dir"] for r in stacked]
    assert not any(line.startswith("stack:") for line in lines), lines


def test_stacked_member_folders_hold_the_files_of_unstacked_runs(runs):
    stacked, alone, _ = runs
    for s, a in zip(stacked, alone):
        sf, af = Path(s["run_dir"]), Path(a["run_dir"])
        files = _files(af)
        assert {"rewind.safetensors", "level_2/mask.safetensors", "level_2/results.json", "results.json",
                "metrics.csv", "hparams.json"} <= files
        assert _files(sf) == files
        # what `lottery report` reads finds the stacked runs as it finds the unstacked ones
        from lottery.report.summary import find_results

        found, expected = find_results([sf.parent]), find_results([af.parent])
        assert sorted((r["seed"], r.get("level")) for r in found) == sorted((r["seed"], r.get("level")) for r in expected)
        assert {r["seed"] for r in found} == set(SEEDS)


def test_jobs_the_stacked_path_cannot_take_are_refused_with_one_line(tmp_path):
    cases = {
        "IMP-C": _jobs(IMP.replace(variant="continue")),
        "LRR": [LRRJob(DATA, MODEL, TRAINING, LRRHparams(levels=1), seed=s) for s in SEEDS],
        "data_order_seed": _jobs(training=TRAINING.replace(data_order_seed=None)),
        "same seed": [IMPJob(DATA, MODEL, TRAINING, IMP, seed=0)] * 2,
        "more than their seed": [IMPJob(DATA, MODEL, TRAINING, IMP, seed=0),
                                 IMPJob(DATA, MODEL, TRAINING, IMP.replace(rate=0.5), seed=1)],
    }
    for expected, jobs in cases.items():
        why = imp_stack_refusal(jobs, _options(tmp_path))
        assert why is not None and expected in why and "\n" not in why, (expected, why)
    assert imp_stack_refusal(_jobs(), _options(tmp_path)) is None
    assert len({imp_stack_key(j) for j in _jobs()}) == 1  # replicates may share a stack
    assert imp_stack_key(cases["more than their seed"][0]) != imp_stack_key(cases["more than their seed"][1])
    # Refused jobs run one by one (as unstacked runs: no stack record), after one line.
    lines: list[str] = []
    jobs = _jobs(IMP.replace(variant="continue", levels=1), TRAINING.replace(training_steps="1ep"))
    results = run_imp_stacked(jobs, _options(tmp_path, lines), raise_errors=True)
    assert [line for line in lines if line.startswith("stacking refused")] == [
        "stacking refused: " + imp_stack_refusal(jobs, _options(tmp_path)) + "; running the 2 IMP searches one by one"]
    assert all("stack" not in r and r["method"] == "imp-c" and len(r["levels"]) == 2 for r in results)
    # fallback=False (a sweep's stacked pass): refused members are left to the caller.
    assert run_imp_stacked(_jobs(IMP.replace(variant="continue", levels=1)), _options(tmp_path / "x"),
                           fallback=False) == [None, None]


def test_a_stack_stopped_after_level_1_resumes_as_a_stack(runs, tmp_path):
    stacked, alone, _ = runs
    out = tmp_path / "resumed"
    first = run_imp_stacked(_jobs(IMP.replace(levels=1)), _options(out), raise_errors=True)
    assert [len(r["levels"]) for r in first] == [2, 2]
    lines: list[str] = []
    resumed = run_imp_stacked(_jobs(), _options(out, lines), raise_errors=True)
    assert "stack: 2 IMP searches resume as a stack after level 1" in lines, lines
    for full, r in zip(stacked, resumed):
        rf, ff = Path(r["run_dir"]), Path(full["run_dir"])
        assert r["stack"]["size"] == 2 and rf.name == ff.name and [x["level"] for x in r["levels"]] == [0, 1, 2]
        for level in (1, 2):  # the same computation as the uninterrupted stack: the same masks, exactly
            a, b = load_tensors(rf / f"level_{level}" / "mask.safetensors"), load_tensors(ff / f"level_{level}" / "mask.safetensors")
            assert all(torch.equal(a[n], b[n]) for n in b), level
        mr, mf = _metrics(rf), _metrics(ff)
        assert [(x["stage"], x["step"]) for x in mr] == [(x["stage"], x["step"]) for x in mf]
        for x, y in zip(mr, mf):
            assert float(x["train_loss"]) == pytest.approx(float(y["train_loss"]), rel=1e-5)
    # Members at different levels (one lost its level 2, the other its levels 1 and 2) finish unstacked.
    shutil.rmtree(Path(resumed[0]["run_dir"]) / "level_2")
    shutil.rmtree(Path(resumed[1]["run_dir"]) / "level_1")
    shutil.rmtree(Path(resumed[1]["run_dir"]) / "level_2")
    lines.clear()
    again = run_imp_stacked(_jobs(), _options(out, lines), raise_errors=True)
    assert "stack: 1 IMP search(es) with 2 finished level(s) on disk finish unstacked" in lines, lines
    assert "stack: 1 IMP search(es) with 1 finished level(s) on disk finish unstacked" in lines, lines
    for full, a, r in zip(stacked, alone, again):
        assert "stack" not in r
        _assert_same_masks(Path(r["run_dir"]), Path(a["run_dir"]), 2)


def test_a_member_that_diverges_stops_the_stack_and_the_members_finish_unstacked(tmp_path, monkeypatch):
    from lottery.engine import stacking
    from lottery.errors import NumericalError

    jobs = _jobs(IMP.replace(levels=1), TRAINING.replace(training_steps="1ep"))
    alone = [run_imp(j, _options(tmp_path / "alone")) for j in jobs]
    original = stacking.StackedTrainer._train_step

    def diverge_in_level_1(self, x, y):
        if self.desc.startswith("imp level 1/") and self.iteration == 3:
            raise NumericalError("the loss became nan at step 3 (stacked members [1])")
        original(self, x, y)

    monkeypatch.setattr(stacking.StackedTrainer, "_train_step", diverge_in_level_1)
    lines: list[str] = []
    results = run_imp_stacked(jobs, _options(tmp_path / "stacked", lines), raise_errors=True)
    assert any(line.startswith("stack: the loss became nan at step 3") and
               line.endswith("the 2 IMP searches finish unstacked") for line in lines), lines
    for r, a in zip(results, alone):  # level 0 from the stack, level 1 alone
        assert "stack" not in r and [x["level"] for x in r["levels"]] == [0, 1]
        assert "stack" in read_json(Path(r["run_dir"]) / "level_0" / "history.json")
        assert "stack" not in read_json(Path(r["run_dir"]) / "level_1" / "history.json")
        _assert_same_masks(Path(r["run_dir"]), Path(a["run_dir"]), 1)


def test_an_unstacked_checkpoint_or_a_trained_unfinished_level_sends_a_member_unstacked(runs, tmp_path):
    from lottery.pipelines.imp_stacked import _finished_levels

    stacked, _, _ = runs
    options = _options(tmp_path)
    folder = tmp_path / "copy"
    shutil.copytree(Path(stacked[0]["run_dir"]), folder)
    assert _finished_levels(folder, 2, options) == 3
    (folder / "level_2" / "results.json").unlink()  # level 2 trained (model.safetensors) but not finished
    assert _finished_levels(folder, 2, options) is None
    shutil.rmtree(folder / "level_2")
    assert _finished_levels(folder, 2, options) == 2
    (folder / "level_2").mkdir()
    (folder / "level_2" / "checkpoint.safetensors").write_bytes(b"")  # an unstacked run's, mid-level
    assert _finished_levels(folder, 2, options) is None
    assert _finished_levels(tmp_path / "empty", 2, options) == 0


def test_any_other_failure_of_a_stack_sends_its_members_unstacked(tmp_path, monkeypatch):
    """A stack that fails for a reason not known to be every member's (here a RuntimeError in level 1)
    leaves its members to run alone from their last finished level: with ``fallback`` they finish there,
    in a sweep (``fallback=False``) they come back as None for the sweep's workers."""
    from lottery.engine import stacking

    jobs = _jobs(IMP.replace(levels=1), TRAINING.replace(training_steps="1ep"))
    original = stacking.StackedTrainer._train_step

    def fail_in_level_1(self, x, y):
        if self.desc.startswith("imp level 1/") and self.iteration == 3:
            raise RuntimeError("disk trouble")
        original(self, x, y)

    monkeypatch.setattr(stacking.StackedTrainer, "_train_step", fail_in_level_1)
    lines: list[str] = []
    assert run_imp_stacked(jobs, _options(tmp_path / "sweep", lines), fallback=False) == [None, None]
    assert any(line.startswith("stack: RuntimeError: disk trouble") and
               line.endswith("the 2 IMP searches finish unstacked") for line in lines), lines
    results = run_imp_stacked(jobs, _options(tmp_path / "alone"), raise_errors=True)
    assert all([x["level"] for x in r["levels"]] == [0, 1] and "stack" not in r for r in results)
