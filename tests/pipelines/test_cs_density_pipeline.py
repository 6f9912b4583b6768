"""run_cs with lottery's default (budget-robust) recipe: convergence figures, target density, refusals."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from lottery.engine import Callback
from lottery.errors import LotteryError
from lottery.experiment import RunOptions
from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
from lottery.io import read_json
from lottery.masks import Mask
from lottery.methods.cs import CSHparams
from lottery.methods.cs_convergence import MAX_UNDECIDED
from lottery.pipelines import cs as cs_pipe
from lottery.pipelines.cs import CSJob, run_cs
from test_cs_pipeline import Interrupt  # the simulated kill of the reference-recipe resume tests

DATA = DataHparams(dataset="synthetic", val_size=64, synthetic_shape=(1, 8, 8), synthetic_classes=4,
                   synthetic_train_size=320, synthetic_test_size=128)
TRAIN = TrainingHparams(training_steps="2ep", batch_size=32, lr=0.05, momentum=0.9)


def _job(cs: CSHparams, mode: str = "prune") -> CSJob:
    return CSJob(data=DATA, model=ModelHparams("lenet_300_100"), training=TRAIN, cs=cs, mode=mode,
                 dense_reference=False)


def _opts(out: Path, logs: list, strict: bool = False) -> RunOptions:
    return RunOptions(out=out, progress=False, log=logs.append, strict=strict)


def test_default_recipe_records_convergence_each_round(tmp_path):
    logs: list[str] = []
    results = run_cs(_job(CSHparams(rounds=2, round_steps="2ep", rewind="1ep"), mode="ticket"), _opts(tmp_path, logs))
    conv = results["convergence"]
    assert [c["round"] for c in conv] == [0, 1]
    for c in conv:
        assert c["undecided"] <= MAX_UNDECIDED and c["converged"]
        assert set(c["undecided_per_layer"]) == {"fc_layers.0.weight", "fc_layers.2.weight"}  # output layer unmasked
    assert conv[-1]["density"] == pytest.approx(results["density"])
    assert results["mask_converged"] is True and 0 < results["density"] < 1
    # the same figures in the round's history, the last row of each round in metrics.csv, and the log
    folder = Path(results["run_dir"])
    assert read_json(folder / "round_1" / "history.json")["convergence"]["flips"] == conv[1]["flips"]
    with open(folder / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ends = [r for r in rows if r["undecided"] != ""]
    assert [r["stage"] for r in ends] == ["round_0", "round_1"]
    assert float(ends[1]["hard_val_accuracy"]) == pytest.approx(conv[1]["hard_val_accuracy"])
    assert sum("cs round 2/2 mask: density" in line for line in logs) == 1
    # a second call reuses the folder and returns the same convergence record
    assert run_cs(_job(CSHparams(rounds=2, round_steps="2ep", rewind="1ep"), mode="ticket"), _opts(tmp_path, []))["convergence"] == conv


@pytest.mark.parametrize("density, rounds", [(0.1, 1), (0.03, 2)])
def test_target_density_is_reached_without_adjusting_the_mask(tmp_path, density, rounds):
    # rounds of 32 steps: in rounds of 8 to 16 steps the mask of the 3 % search was not yet binary
    results = run_cs(_job(CSHparams(density=density, rounds=rounds, round_steps="4ep")), _opts(tmp_path, []))
    n = results["prunable_weights"]
    assert results["kept_weights"] == round(density * n)
    assert results["target_density"] == density
    assert results["s0"] == pytest.approx(0.02)
    assert all(c["converged"] for c in results["convergence"])


def _unconverging() -> CSHparams:
    # the paper's recipe with a very low temperature: the sigmoid never hardens
    return CSHparams(rounds=1, round_steps="1ep", mask_optimizer="sgd", temperature_schedule="epoch",
                     beta_final=1.0, s0=0.0)


def test_strict_stops_when_the_mask_did_not_converge_and_the_round_is_kept(tmp_path):
    with pytest.raises(LotteryError, match="did not converge in round 1.*--strict"):
        run_cs(_job(_unconverging()), _opts(tmp_path, [], strict=True))
    folders = list(tmp_path.glob("prune-cs_*"))
    assert (folders[0] / "round_0" / "state.safetensors").exists()
    assert not (folders[0] / "results.json").exists()
    logs: list[str] = []
    results = run_cs(_job(_unconverging()), _opts(tmp_path, logs))  # without --strict: a warning, then on
    assert results["mask_converged"] is False
    assert any(line.startswith("warning: the CS mask did not converge") for line in logs)


def test_a_mask_that_keeps_everything_is_refused(tmp_path):
    with pytest.raises(LotteryError, match="kept every prunable weight"):
        run_cs(_job(CSHparams(rounds=1, round_steps="1ep", s0=50.0, lam=0.0)), _opts(tmp_path, []))


def test_a_density_search_killed_mid_round_resumes_to_the_same_mask(tmp_path, monkeypatch):
    """The density schedule's start, the logits' Adam state and the shift total live in the round checkpoint."""
    job = _job(CSHparams(density=0.05, rounds=2, round_steps="2ep"))
    reference = run_cs(job, _opts(tmp_path / "reference", []))
    original = cs_pipe.search_round_callbacks
    crashed = []

    def crashing(hp, round_index, *args):
        cbs = original(hp, round_index, *args)
        if round_index == 1 and not crashed:
            crashed.append(True)
            cbs.append(Interrupt(8 + 3))  # mid-epoch 1 of round 1 (8 steps per epoch), after a checkpoint
        return cbs

    monkeypatch.setattr(cs_pipe, "search_round_callbacks", crashing)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_cs(job, _opts(out, []))
    logs: list[str] = []
    results = run_cs(job, _opts(out, logs))
    assert crashed == [True] and any("resumed" in line for line in logs)
    for key in ("density", "kept_weights", "density_logit_shift", "test_accuracy", "convergence"):
        assert results[key] == reference[key], key
    assert Mask.load(Path(results["run_dir"]) / "mask.safetensors") == Mask.load(Path(reference["run_dir"]) / "mask.safetensors")


def test_logit_groups_off_the_schedule_keep_their_learning_rate(tmp_path):
    """Adam logits (follow_schedule=False) keep a constant LR while the weights' cosine LR decays."""
    seen: list[tuple[float, float]] = []

    class Spy(Callback):
        def on_step_start(self, trainer):
            seen.append((trainer.optimizers[0].param_groups[0]["lr"], trainer.optimizers[1].param_groups[0]["lr"]))

    original = cs_pipe.search_round_callbacks
    job = _job(CSHparams(rounds=1, round_steps="2ep"))
    job = CSJob(data=job.data, model=job.model, training=TRAIN.replace(schedule="cosine"), cs=job.cs, mode="prune",
                dense_reference=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cs_pipe, "search_round_callbacks", lambda *a: [*original(*a), Spy()])
        run_cs(job, _opts(tmp_path, []))
    weights_lr = [w for w, _ in seen]
    logits_lr = {m for _, m in seen}
    assert weights_lr[0] == pytest.approx(0.05) and weights_lr[-1] < 0.01  # the recipe's cosine decay
    assert len(logits_lr) == 1 and logits_lr.pop() == pytest.approx(0.1 / 4)  # 0.1 / sqrt(16 steps per round)
