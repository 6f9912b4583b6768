"""A run folder is whole or it is not used: a deleted weight or mask file is rebuilt by running the same
job again, a damaged one is refused naming it, commands that read a run never use a half one (no
unpruned network in place of a ticket), and a moved folder is reused where it is now."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lottery.errors import CheckpointError
from lottery.experiment import RunOptions
from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
from lottery.io import load_tensors, read_json
from lottery.methods.cs import CSHparams
from lottery.methods.imp import IMPHparams
from lottery.pipelines.cs import CSJob, run_cs
from lottery.pipelines.imp import IMPJob, run_imp
from lottery.pipelines.structured import load_run_network

DATA = DataHparams(dataset="synthetic", val_size=64, synthetic_shape=(1, 8, 8), synthetic_classes=4,
                   synthetic_train_size=320, synthetic_test_size=128)
TRAIN = TrainingHparams(training_steps="2ep", batch_size=32, lr=0.05, momentum=0.9)
CS = CSHparams(rounds=1, round_steps="1ep", rewind="2it", density=0.3)
JOB = CSJob(data=DATA, model=ModelHparams("lenet_300_100"), training=TRAIN, cs=CS, dense_reference=False)


def _options(out: Path, logs: list | None = None) -> RunOptions:
    return RunOptions(out=out, progress=False, log=(logs.append if logs is not None else (lambda m: None)))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    results = run_cs(JOB, _options(out))
    return out, Path(results["run_dir"]), results


def _copy(finished, tmp_path) -> tuple[Path, Path]:
    out, folder, _ = finished
    shutil.copytree(out, tmp_path / "runs")
    return tmp_path / "runs", tmp_path / "runs" / folder.name


def test_a_deleted_mask_is_refused_by_readers_and_rebuilt_by_the_same_job(finished, tmp_path):
    out, folder = _copy(finished, tmp_path)
    original = load_tensors(folder / "mask.safetensors")
    (folder / "mask.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"mask.safetensors is missing, so .* holds no ticket"):
        load_run_network(folder)  # what export, bench-latency and structure read: never the unpruned network
    logs: list[str] = []
    again = run_cs(JOB, _options(out, logs))
    assert any("mask.safetensors is missing: running again to rebuild it" in line for line in logs)
    rebuilt = load_tensors(folder / "mask.safetensors")
    assert rebuilt.keys() == original.keys() and all(torch.equal(rebuilt[k], original[k]) for k in original)
    assert again["test_accuracy"] == finished[2]["test_accuracy"]
    model, mask, _ = load_run_network(folder)
    assert mask is not None and mask.density() == pytest.approx(finished[2]["density"])


def test_a_deleted_ticket_is_retrained(finished, tmp_path):
    out, folder = _copy(finished, tmp_path)
    (folder / "ticket" / "model.safetensors").unlink()
    again = run_cs(JOB, _options(out))
    assert (folder / "ticket" / "model.safetensors").is_file()
    assert again["test_accuracy"] == finished[2]["test_accuracy"]


def test_a_damaged_artefact_is_refused_naming_it_and_rebuilt_once_deleted(finished, tmp_path):
    out, folder = _copy(finished, tmp_path)
    data = (folder / "mask.safetensors").read_bytes()
    original = {k: v.clone() for k, v in load_tensors(folder / "mask.safetensors").items()}  # not the mapped file
    (folder / "mask.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"mask.safetensors is damaged .*delete it and run the same command"):
        run_cs(JOB, _options(out))
    (folder / "mask.safetensors").unlink()  # as the message says
    run_cs(JOB, _options(out))
    rebuilt = load_tensors(folder / "mask.safetensors")
    assert rebuilt.keys() == original.keys() and all(torch.equal(rebuilt[k], original[k]) for k in original)


def test_a_mask_damaged_while_an_unfinished_run_was_stopped_is_refused_not_recorded(finished, tmp_path):
    """The run is resumed (results.json gone, as after a kill during a rebuild): the damaged mask must not
    be taken, nor listed in artefacts.json as if whole."""
    out, folder = _copy(finished, tmp_path)
    (folder / "results.json").unlink()
    data = (folder / "mask.safetensors").read_bytes()
    (folder / "mask.safetensors").write_bytes(data[:50])
    with pytest.raises(CheckpointError, match="mask.safetensors"):
        run_cs(JOB, _options(out))
    assert not (folder / "results.json").exists()


def test_a_moved_run_folder_is_reused_where_it_is_now(finished, tmp_path):
    out, folder, results = finished
    moved = tmp_path / "elsewhere"
    shutil.copytree(out, moved)
    logs: list[str] = []
    again = run_cs(JOB, _options(moved, logs))
    assert again["run_dir"] == str(moved / folder.name)
    assert again["test_accuracy"] == results["test_accuracy"]
    assert any("already finished" in line and str(moved) in line for line in logs)


def test_an_imp_level_with_a_deleted_model_is_trained_again(tmp_path):
    job = IMPJob(DATA, ModelHparams("lenet_300_100"), TRAIN, IMPHparams(levels=2, rewind="2it"))
    first = run_imp(job, _options(tmp_path))
    folder = Path(first["run_dir"])
    (folder / "level_1" / "model.safetensors").unlink()
    logs: list[str] = []
    again = run_imp(job, _options(tmp_path, logs))
    assert any("level_1" in line and "model.safetensors is missing" in line for line in logs)
    assert (folder / "level_1" / "model.safetensors").is_file()
    assert [lv["test_accuracy"] for lv in again["levels"]] == [lv["test_accuracy"] for lv in first["levels"]]
    assert read_json(folder / "level_1" / "results.json")["test_accuracy"] == first["levels"][1]["test_accuracy"]
