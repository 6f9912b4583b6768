"""The resumable CS job ``run_cs`` on tiny synthetic data: folder contents, the invariants of every stage
(round reset, final mask, rewound ticket, exact zeros), stage skipping, pruning mode and resuming."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lottery.methods.cs as cs_methods
import lottery.pipelines.cs as cs_pipe
from lottery import masking
from lottery.engine import Callback, Trainer
from lottery.errors import ConfigError
from lottery.experiment import RunOptions
from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
from lottery.io import load_tensors, read_json
from lottery.masks import Mask
from lottery.methods.cs import CSHparams
from lottery.models import registry
from lottery.pipelines.cs import CSJob, run_cs

# 320 training images of 1x8x8, 64 held out: 256 / 32 = 8 iterations per epoch
DATA = DataHparams(dataset="synthetic", val_size=64, synthetic_shape=(1, 8, 8), synthetic_classes=4,
                   synthetic_train_size=320, synthetic_test_size=128)
IPE = 8
TRAIN = TrainingHparams(training_steps="3ep", batch_size=32, lr=0.05, momentum=0.9, weight_decay=1e-4)
# the reference recipe (SGD logits, per-epoch temperature): these tests check the paper's mechanics
CS = CSHparams(s0=0.0, lam=5e-6, beta_final=50.0, rounds=2, round_steps="2ep", rewind="1ep",
               mask_optimizer="sgd", temperature_schedule="epoch")
JOB = CSJob(data=DATA, model=ModelHparams("lenet_300_100"), training=TRAIN, cs=CS, dense_reference=True)


def _options(out: Path, logs: list | None = None) -> RunOptions:
    return RunOptions(out=out, progress=False, log=(logs.append if logs is not None else (lambda m: None)))


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _logits(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    suffix = "_mask_logits"
    return {k[: -len(suffix)]: v for k, v in state.items() if k.endswith(suffix)}


# -- instrumentation: read-only callbacks slipped into run_cs --------------------------------------
class RoundRecorder(Callback):
    """Records the state a search round starts from and the temperature of every step."""

    def __init__(self, record: dict, round_index: int):
        self.record, self.r = record, round_index

    def on_fit_start(self, trainer):
        self.record.setdefault("round_start", {})[self.r] = {
            "iteration": trainer.iteration,
            "logits": {n: s.detach().clone() for n, s in masking.mask_logits(trainer.model).items()},
            "state": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        }

    def on_step_end(self, trainer):
        if trainer.iteration == IPE:  # the rewind point k = 1ep of the baseline
            sd = masking.to_plain_state_dict(trainer.model.state_dict(), apply_masks=False)
            self.record.setdefault("state_at_1ep", {})[self.r] = {k: v.detach().clone() for k, v in sd.items()}

    def on_step_start(self, trainer):
        self.record.setdefault("betas", {}).setdefault(self.r, []).append(
            (trainer.iteration, trainer.epoch, masking.get_temperature(trainer.model)))


def _instrument(mp: pytest.MonkeyPatch) -> dict:
    record: dict = {"ticket_checks_before": 0, "ticket_checks_after": 0}
    original = cs_pipe.search_round_callbacks

    def search_round_callbacks(hp, round_index, *args):
        return [*original(hp, round_index, *args), RoundRecorder(record, round_index)]

    def check_pruned_zero(model, mask: Mask, when: str) -> None:
        params = masking.logical_named_parameters(model)
        for n, m in mask.items():
            assert torch.all(params[n].detach()[~m] == 0), (when, n)

    class CheckedEnforce(cs_methods.EnforceMaskCallback):
        """The real callback, plus checks that pruned weights are 0 before and after it re-zeroes them."""

        def on_fit_start(self, trainer):
            super().on_fit_start(trainer)
            record["ticket_start_iteration"] = trainer.iteration
            record["ticket_mask"] = masking.current_mask(trainer.model)
            record["ticket_start"] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            record["ticket_lr_start"] = trainer.schedule(trainer.iteration)

        def on_step_end(self, trainer):
            mask = record["ticket_mask"]
            check_pruned_zero(trainer.model, mask, f"after step {trainer.iteration}, before enforce")
            record["ticket_checks_before"] += 1
            super().on_step_end(trainer)
            check_pruned_zero(trainer.model, mask, f"after step {trainer.iteration}, after enforce")
            record["ticket_checks_after"] += 1

    mp.setattr(cs_pipe, "search_round_callbacks", search_round_callbacks)
    mp.setattr(cs_pipe, "EnforceMaskCallback", CheckedEnforce)
    return record


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One uninterrupted, instrumented ticket search with a dense reference."""
    out = tmp_path_factory.mktemp("baseline")
    logs: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        record = _instrument(mp)
        results = run_cs(JOB, _options(out, logs))
    return SimpleNamespace(out=out, folder=Path(results["run_dir"]), results=results, record=record, logs=logs)


# -- 11. folder contents and results ----------------------------------------------------------------
def test_ticket_run_folder_and_results(baseline):
    folder, results = baseline.folder, baseline.results
    assert folder.parent == baseline.out and folder.name.startswith("search-cs_lenet_300_100_synthetic_s0_")
    for name in ["hparams.json", "rewind.safetensors", "round_0/state.safetensors", "round_0/history.json",
                 "round_1/state.safetensors", "round_1/history.json", "mask.safetensors", "mask.json",
                 "ticket/model.safetensors", "metrics.csv", "results.json"]:
        assert (folder / name).is_file(), name
    assert not (folder / "round_2").exists() and not (folder / "pruned").exists()
    assert not list(folder.rglob("checkpoint.safetensors"))  # removed after each stage
    hp = read_json(folder / "hparams.json")
    assert hp["kind"] == "search-cs" and hp["cs"] == CS.to_dict() and hp["data"] == DATA.to_dict()

    assert read_json(folder / "results.json") == results
    assert results["method"] == "cs" and results["mode"] == "ticket" and results["kind"] == "search-cs"
    assert results["rounds"] == 2 and results["rewind"] == "1ep"
    mask = Mask.load(folder / "mask.safetensors")
    assert results["density"] == mask.density()
    assert results["kept_weights"] == mask.num_kept() and results["prunable_weights"] == mask.num_total()
    assert read_json(folder / "mask.json")["density"] == pytest.approx(mask.density())
    assert 0 < mask.density() < 1  # the search pruned some weights and kept some
    assert results["search_epochs"] == 2 * 2
    assert results["epochs"] == 2 * 2 + (3 - 1)
    assert 0 <= results["test_accuracy"] <= 1 and results["test_accuracy"] > 0.5  # 4 classes: well above chance
    dense = read_json(Path(results["dense_run_dir"]) / "results.json")
    assert results["dense_test_accuracy"] == dense["test_accuracy"]
    assert Path(results["dense_run_dir"]).parent == baseline.out

    rows = _rows(folder)
    stages = [r["stage"] for r in rows]
    assert stages == ["round_0"] * 2 + ["round_1"] * 2 + ["ticket"] * 2  # one row per epoch of each stage
    assert [int(r["step"]) for r in rows] == [8, 16, 8, 16, 16, 24]  # ticket runs from k = 1ep to 3ep
    assert float(rows[-1]["test_accuracy"]) == results["test_accuracy"]
    for r in rows[:4]:  # search rows report the hard-mask density
        assert 0 <= float(r["density"]) <= 1
    assert float(rows[3]["density"]) == pytest.approx(mask.density())


def test_prunable_names_follow_the_model_spec(baseline):
    mask = Mask.load(baseline.folder / "mask.safetensors")
    assert list(mask) == ["fc_layers.0.weight", "fc_layers.2.weight"]  # lenet keeps its output layer dense
    assert "fc.weight_mask_logits" not in load_tensors(baseline.folder / "round_1" / "state.safetensors")


# -- 3 / 4. temperature and the reset between rounds inside run_cs ------------------------------------
def test_beta_per_epoch_inside_run_cs(baseline):
    betas = baseline.record["betas"]
    assert sorted(betas) == [0, 1]
    for r, steps in betas.items():
        assert len(steps) == 2 * IPE
        assert all(b == 1.0 for _, e, b in steps if e == 0), r  # first epoch of each round
        assert all(b == pytest.approx(CS.beta_final) for _, e, b in steps if e == 1), r  # last epoch
    rows = _rows(baseline.folder)
    assert [float(r["beta"]) for r in rows[:4]] == pytest.approx([1.0, 50.0, 1.0, 50.0])


def test_round_reset_inside_run_cs(baseline):
    folder, start = baseline.folder, baseline.record["round_start"]
    end0 = load_tensors(folder / "round_0" / "state.safetensors")
    s_end0 = _logits(end0)
    assert start[0]["iteration"] == 0 and start[1]["iteration"] == 0  # the LR schedule restarts
    for n, s in start[0]["logits"].items():
        assert torch.all(s == CS.s0)
    pruned_end0 = 0
    for n, s_start1 in start[1]["logits"].items():
        expected = torch.clamp(CS.beta_final * s_end0[n], max=CS.s0)
        assert torch.equal(s_start1, expected), n
        was_pruned = s_end0[n] <= 0
        assert torch.all(s_start1[was_pruned] <= 0), n  # every weight pruned after round 0 is still pruned
        assert torch.all(s_start1[s_end0[n] < 0] < -0.0)
        pruned_end0 += int(was_pruned.sum())
    assert pruned_end0 > 0
    # the weights are not rewound between rounds
    for k, v in end0.items():
        if not k.endswith("_mask_logits"):
            assert torch.equal(start[1]["state"][k], v), k


# -- 6. the final mask ------------------------------------------------------------------------------
def test_final_mask_is_strict_hard_mask_of_last_round_logits(baseline):
    folder = baseline.folder
    last = _logits(load_tensors(folder / f"round_{CS.rounds - 1}" / "state.safetensors"))
    expected = Mask({n: s > 0 for n, s in last.items()})
    saved = Mask.load(folder / "mask.safetensors")
    assert saved == expected
    for n, m in saved.items():
        assert m.dtype == torch.bool and m.shape == last[n].shape
    report = read_json(folder / "mask.json")
    assert report["density"] == pytest.approx(expected.density())
    assert report["kept"] == expected.num_kept() and report["total"] == expected.num_total()
    for n, layer in report["layers"].items():
        assert layer["kept"] == int(expected[n].sum())
    assert baseline.results["density"] == expected.density()


# -- 7 / 8. the ticket -------------------------------------------------------------------------------
def test_ticket_pruned_weights_exactly_zero_at_every_step_and_in_the_file(baseline):
    record, folder = baseline.record, baseline.folder
    mask = Mask.load(folder / "mask.safetensors")
    assert record["ticket_mask"] == mask
    assert record["ticket_checks_before"] == record["ticket_checks_after"] == (3 - 1) * IPE
    ticket = load_tensors(folder / "ticket" / "model.safetensors")
    assert not any(k.endswith("_mask") or k.endswith("_mask_logits") for k in ticket)
    for n, m in mask.items():
        assert torch.all(ticket[n][~m] == 0), n
        assert torch.all(ticket[n][m] != 0), n  # kept weights trained (not zeroed)


def test_ticket_starts_from_mask_times_rewind_state(baseline):
    record, folder = baseline.record, baseline.folder
    mask = Mask.load(folder / "mask.safetensors")
    rewind = load_tensors(folder / "rewind.safetensors")
    start = record["ticket_start"]
    assert record["ticket_start_iteration"] == IPE  # rewind point k = 1ep
    assert not any(k.endswith("_mask_logits") for k in rewind)
    for k, v in rewind.items():
        if k in mask:
            assert torch.equal(start[k], torch.where(mask[k], v, torch.zeros_like(v))), k
        else:
            assert torch.equal(start[k], v), k
    # the rewind point is round 0's raw weights after k steps (not the initialisation, not a later round)
    at_k = baseline.record["state_at_1ep"][0]
    assert rewind.keys() == at_k.keys()
    for k, v in at_k.items():
        assert torch.equal(rewind[k], v), k
    round0 = baseline.record["round_start"][0]["state"]
    assert not torch.equal(rewind["fc_layers.0.weight"], round0["fc_layers.0.weight"])


def _bn_net(*, input_shape, num_classes, **options):
    c, h, w = input_shape
    return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * (h // 2) * (w // 2), 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, num_classes))


@pytest.fixture
def bn_model(monkeypatch):
    name = "cs_test_tiny_bn"
    monkeypatch.setitem(registry._REGISTRY, name, registry.ModelSpec(
        name=name, builder=_bn_net, input_shape=(1, 8, 8), num_classes=4, prune_ignore=("8.weight",)))
    return name


def test_ticket_rewinds_weights_and_batchnorm_buffers(tmp_path, monkeypatch, bn_model):
    record = _instrument(monkeypatch)
    job = CSJob(data=DATA, model=ModelHparams(bn_model), training=TRAIN,
                cs=CS.replace(rewind="3it", lam=1e-4), dense_reference=False)
    results = run_cs(job, _options(tmp_path))
    folder = Path(results["run_dir"])
    mask = Mask.load(folder / "mask.safetensors")
    assert list(mask) == ["0.weight", "5.weight"] and 0 < mask.density() < 1
    rewind = load_tensors(folder / "rewind.safetensors")
    # taken after exactly k = 3 steps of round 0
    assert int(rewind["1.num_batches_tracked"]) == 3 and int(rewind["6.num_batches_tracked"]) == 3
    assert not torch.equal(rewind["1.running_mean"], torch.zeros(4))
    start = record["ticket_start"]
    assert record["ticket_start_iteration"] == 3
    assert set(start) == set(rewind) | {n + "_mask" for n in mask}
    for k, v in rewind.items():
        expected = torch.where(mask[k], v, torch.zeros_like(v)) if k in mask else v
        assert torch.equal(start[k], expected), k
    assert results["epochs"] == 2 * 2 + (3 * IPE - 3) / IPE
    ticket = load_tensors(folder / "ticket" / "model.safetensors")
    for n, m in mask.items():
        assert torch.all(ticket[n][~m] == 0)
    assert int(ticket["1.num_batches_tracked"]) == 3 * IPE  # BN kept counting from the rewind point


# -- 11. stage skipping, pruning mode, configuration errors -----------------------------------------
def test_second_call_returns_saved_results_without_training(baseline, monkeypatch):
    stamps = {p: p.stat().st_mtime_ns for p in baseline.folder.rglob("*") if p.is_file()}

    def no_training(self):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(Trainer, "fit", no_training)
    again = run_cs(JOB, _options(baseline.out))
    assert again == baseline.results
    assert {p: p.stat().st_mtime_ns for p in baseline.folder.rglob("*") if p.is_file()} == stamps


def test_cs_pruning_reuses_the_finished_search_of_its_ticket_run(tmp_path):
    ticket = CSJob(data=DATA, model=ModelHparams("lenet_300_100"), training=TRAIN, cs=CS, dense_reference=False)
    prune = dataclasses.replace(ticket, mode="prune")
    fresh = run_cs(prune, _options(tmp_path / "fresh"))
    out, logs = tmp_path / "both", []
    run_cs(ticket, _options(out))
    r = run_cs(prune, _options(out, logs))
    assert any("reusing the finished CS search" in line for line in logs), logs
    for key in ("density", "kept_weights", "test_accuracy", "epochs", "search_epochs"):
        assert r[key] == fresh[key], key
    folder, want = Path(r["run_dir"]), Path(fresh["run_dir"])
    assert Mask.load(folder / "mask.safetensors") == Mask.load(want / "mask.safetensors")
    a, b = load_tensors(folder / "pruned/model.safetensors"), load_tensors(want / "pruned/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [row["stage"] for row in _rows(folder)] == [row["stage"] for row in _rows(want)]
    # an unfinished ticket search (its last round's state missing) is not reused: the run searches itself
    out, logs = tmp_path / "unfinished", []
    sibling = Path(run_cs(ticket, _options(out))["run_dir"])
    (sibling / f"round_{CS.rounds - 1}" / "state.safetensors").unlink()
    r = run_cs(prune, _options(out, logs))
    assert not any("reusing" in line for line in logs) and r["test_accuracy"] == fresh["test_accuracy"]


@pytest.mark.parametrize("finetune", ["0ep", "1ep"])
def test_prune_mode(tmp_path, finetune):
    job = CSJob(data=DATA, model=ModelHparams("lenet_300_100"), training=TRAIN,
                cs=CS.replace(finetune_steps=finetune), mode="prune", dense_reference=False)
    results = run_cs(job, _options(tmp_path))
    folder = Path(results["run_dir"])
    assert folder.name.startswith("prune-cs_")
    assert results["mode"] == "prune" and results["method"] == "cs" and results["rewind"] is None
    assert (folder / "pruned" / "model.safetensors").is_file()
    assert not (folder / "ticket").exists() and not (folder / "rewind.safetensors").exists()
    assert "dense_test_accuracy" not in results
    mask = Mask.load(folder / "mask.safetensors")
    last = load_tensors(folder / "round_1" / "state.safetensors")
    assert mask == Mask({n: s > 0 for n, s in _logits(last).items()})
    assert results["density"] == mask.density() and 0 < mask.density() < 1
    pruned = load_tensors(folder / "pruned" / "model.safetensors")
    assert set(pruned) == {k for k in last if not k.endswith("_mask_logits")}
    for n, m in mask.items():
        assert torch.all(pruned[n][~m] == 0), n
    stages = [r["stage"] for r in _rows(folder)]
    ft_epochs = 1 if finetune == "1ep" else 0
    assert results["epochs"] == 2 * 2 + ft_epochs
    assert "test_accuracy_before_finetune" in results
    if ft_epochs:
        assert stages == ["round_0"] * 2 + ["round_1"] * 2 + ["finetune"]
        assert results["test_accuracy"] == float(_rows(folder)[-1]["test_accuracy"])
        assert not torch.equal(pruned["fc.weight"], last["fc.weight"])  # fine-tuned
    else:
        assert stages == ["round_0"] * 2 + ["round_1"] * 2
        assert results["test_accuracy"] == results["test_accuracy_before_finetune"]
        # The final weights x the hard mask, with the beta -> infinity factor 1 / sigmoid(s0) on kept weights.
        factor = 1.0 / torch.sigmoid(torch.tensor(CS.s0, dtype=torch.float64)).item()
        for k, v in pruned.items():
            expected = torch.where(mask[k], last[k] * factor, torch.zeros_like(last[k])) if k in mask else last[k]
            assert torch.allclose(v, expected, rtol=1e-6, atol=0), k
            if k in mask:
                assert torch.all(v[~mask[k]] == 0), k


@pytest.mark.parametrize("rewind, round_steps", [("3ep", "2ep"), ("5ep", "2ep"), ("3ep", None)])
def test_rewind_after_end_of_training_or_round_is_a_config_error(tmp_path, rewind, round_steps):
    """3ep is the end of training; with 2ep rounds it is also past the end of round 0."""
    job = CSJob(data=DATA, model=ModelHparams("lenet_300_100"), training=TRAIN,
                cs=CS.replace(rewind=rewind, round_steps=round_steps), dense_reference=False)
    with pytest.raises(ConfigError, match="rewind"):
        run_cs(job, _options(tmp_path))
    assert not list(tmp_path.rglob("*.safetensors"))


def test_invalid_rewind_fails_before_any_training(tmp_path, monkeypatch):
    """The configuration error comes at once, not after the dense reference was trained."""

    def no_training(self):
        raise AssertionError("trained before the configuration was checked")

    monkeypatch.setattr(Trainer, "fit", no_training)
    job = CSJob(data=DATA, model=ModelHparams("lenet_300_100"), training=TRAIN, cs=CS.replace(rewind="3ep"),
                dense_reference=True)
    with pytest.raises(ConfigError, match="rewind"):
        run_cs(job, _options(tmp_path))


def test_rewind_after_round_end_but_before_training_end_is_a_config_error(tmp_path):
    job = CSJob(data=DATA, model=ModelHparams("lenet_300_100"), training=TRAIN.replace(training_steps="4ep"),
                cs=CS.replace(rewind="3ep", round_steps="2ep"), dense_reference=False)
    with pytest.raises(ConfigError, match="rewind"):
        run_cs(job, _options(tmp_path))


# -- 12. resuming after an interruption -------------------------------------------------------------
class Interrupt(Callback):
    def __init__(self, at_iteration: int):
        self.at = at_iteration

    def on_step_end(self, trainer):
        if trainer.iteration == self.at:
            raise KeyboardInterrupt("simulated kill")


def _assert_same_outcome(folder: Path, results: dict, baseline) -> None:
    assert Mask.load(folder / "mask.safetensors") == Mask.load(baseline.folder / "mask.safetensors")
    assert results["test_accuracy"] == baseline.results["test_accuracy"]
    assert results["density"] == baseline.results["density"]
    assert results["epochs"] == baseline.results["epochs"]
    for name in ["rewind.safetensors", "round_0/state.safetensors", "round_1/state.safetensors",
                 "ticket/model.safetensors"]:
        a, b = load_tensors(folder / name), load_tensors(baseline.folder / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)  # bit for bit on CPU
    assert [r["stage"] for r in _rows(folder)] == [r["stage"] for r in _rows(baseline.folder)]
    assert [r["test_accuracy"] for r in _rows(folder)] == [r["test_accuracy"] for r in _rows(baseline.folder)]


def test_resume_after_interrupt_in_round_1(tmp_path, monkeypatch, baseline):
    job = CSJob(data=DATA, model=ModelHparams("lenet_300_100"), training=TRAIN, cs=CS, dense_reference=False)
    original = cs_pipe.search_round_callbacks
    crashed = []

    def crashing(hp, round_index, *args):
        cbs = original(hp, round_index, *args)
        if round_index == 1 and not crashed:
            crashed.append(True)
            cbs.append(Interrupt(IPE + 3))  # mid-epoch 1 of round 1, after the epoch-0 checkpoint
        return cbs

    monkeypatch.setattr(cs_pipe, "search_round_callbacks", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_cs(job, _options(tmp_path))
    folder = next(tmp_path.glob("search-cs_*"))
    assert (folder / "round_0" / "state.safetensors").is_file()
    assert (folder / "round_1" / "checkpoint.safetensors").is_file()
    assert not (folder / "round_1" / "state.safetensors").exists() and not (folder / "results.json").exists()

    logs: list[str] = []
    results = run_cs(job, _options(tmp_path, logs))
    assert crashed == [True]
    assert any("resumed" in m for m in logs)  # it did continue from the checkpoint
    _assert_same_outcome(folder, results, baseline)


@pytest.mark.parametrize("rewind", ["1ep", "3it"])
def test_resume_after_interrupt_in_round_0_keeps_the_rewind_point(tmp_path, monkeypatch, rewind):
    """Killed in round 0 after the rewind point (k = 1ep: resumed exactly at k; 3it: past it)."""
    job = CSJob(data=DATA, model=ModelHparams("lenet_300_100"), training=TRAIN, cs=CS.replace(rewind=rewind),
                dense_reference=False)
    reference = run_cs(job, _options(tmp_path / "reference"))
    ref = SimpleNamespace(folder=Path(reference["run_dir"]), results=reference)
    original = cs_pipe.search_round_callbacks
    crashed = []

    def crashing(hp, round_index, *args):
        cbs = original(hp, round_index, *args)
        if round_index == 0 and not crashed:
            crashed.append(True)
            cbs.append(Interrupt(IPE + 2))
        return cbs

    monkeypatch.setattr(cs_pipe, "search_round_callbacks", crashing)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_cs(job, _options(out))
    folder = next(out.glob("search-cs_*"))
    assert (folder / "rewind.safetensors").is_file() and (folder / "round_0" / "checkpoint.safetensors").is_file()
    results = run_cs(job, _options(out))
    _assert_same_outcome(folder, results, ref)


def test_resume_after_interrupt_in_ticket_retraining(tmp_path, monkeypatch, baseline):
    job = CSJob(data=DATA, model=ModelHparams("lenet_300_100"), training=TRAIN, cs=CS, dense_reference=False)
    crashed = []

    class CrashingEnforce(cs_methods.EnforceMaskCallback):
        def on_step_end(self, trainer):
            super().on_step_end(trainer)
            if trainer.iteration == 2 * IPE + 5 and not crashed:  # mid second ticket epoch
                crashed.append(True)
                raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(cs_pipe, "EnforceMaskCallback", CrashingEnforce)
    with pytest.raises(KeyboardInterrupt):
        run_cs(job, _options(tmp_path))
    folder = next(tmp_path.glob("search-cs_*"))
    assert (folder / "ticket" / "checkpoint.safetensors").is_file()
    assert (folder / "mask.safetensors").is_file() and not (folder / "results.json").exists()
    mask_stamp = (folder / "mask.safetensors").stat().st_mtime_ns

    logs: list[str] = []
    results = run_cs(job, _options(tmp_path, logs))
    assert crashed == [True]
    assert any("ticket: resumed" in m for m in logs)
    assert (folder / "mask.safetensors").stat().st_mtime_ns == mask_stamp  # the search was not redone
    _assert_same_outcome(folder, results, baseline)


def test_a_mask_that_prunes_everything_is_a_clear_error(tmp_path):
    """s0 far below 0 prunes every weight: no ticket to train, so say so instead of training an empty net."""
    from lottery.errors import LotteryError

    job = CSJob(data=DATA, model=ModelHparams("lenet_300_100"), training=TRAIN, cs=CS.replace(s0=-5.0),
                dense_reference=False)
    with pytest.raises(LotteryError, match=r"pruned every prunable weight.*larger --s0"):
        run_cs(job, _options(tmp_path))
    assert not list(tmp_path.glob("*/ticket/model.safetensors"))


def test_one_epoch_rounds_warn_that_beta_cannot_anneal(tmp_path):
    lines = []
    job = CSJob(data=DATA, model=ModelHparams("lenet_300_100"), training=TRAIN,
                cs=CS.replace(round_steps="1ep", rounds=1), dense_reference=False)
    results = run_cs(job, RunOptions(out=tmp_path, progress=False, log=lines.append))
    assert any(l.startswith("plan: CS 1 round(s) x 1 epochs") for l in lines)
    # the folder is named with the plan, before any training, so that its metrics.csv can be followed
    plan = next(i for i, l in enumerate(lines) if l.startswith("plan: "))
    named = lines.index(f"this search's folder: {results['run_dir']}")
    assert plan < named < next(i for i, l in enumerate(lines) if "epoch 1/" in l)
    assert any("cannot anneal the temperature" in l for l in lines)


def test_short_rounds_warn_of_large_temperature_jumps_unless_beta_grows_per_iteration(tmp_path):
    """Per-epoch beta in 2-epoch rounds jumps 1 -> beta_final in one step (a Conv-4 search collapsed)."""
    def warnings_of(cs):
        lines = []
        job = CSJob(data=DATA, model=ModelHparams("lenet_300_100"), training=TRAIN.replace(training_steps="2ep"),
                    cs=cs, dense_reference=False)
        run_cs(job, RunOptions(out=tmp_path / cs.temperature_schedule, progress=False, log=lines.append))
        return [l for l in lines if "per-epoch temperature" in l or "cannot anneal" in l]

    short = CS.replace(round_steps="2ep", rounds=1, rewind="0it")
    (warning,) = warnings_of(short)
    assert "2-epoch CS rounds" in warning and "only 2 values from 1 to 50" in warning
    assert warnings_of(short.replace(temperature_schedule="iteration")) == []
