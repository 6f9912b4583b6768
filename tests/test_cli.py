"""The `lottery` command as a user meets it: subprocesses, real exit codes, files on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from lottery import cli

SYNTH = ["--dataset", "synthetic", "--synthetic-shape", "1,8,8", "--synthetic-train-size", "600",
         "--synthetic-test-size", "200", "--val-size", "100", "--batch-size", "32", "--threads", "1"]


def lottery(*args: str, cwd: Path, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "lottery", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"lottery {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--model", "lenet5"], "unknown model 'lenet5'; known models: conv2"),
        (["train", "--dataset", "imagenette"], "unknown data set 'imagenette'"),
        (["train", "--epochs", "-3"], "--epochs must be a positive integer"),
        (["train", "--training-steps=-3ep"], "TrainingHparams.training_steps"),
        (["train", "--lr", "-1"], "TrainingHparams.lr must be a positive number"),
        (["train", "--batch-size", "abc"], "expected an integer"),
        (["train", "--preset", "nope"], "unknown preset 'nope'"),
        (["search", "cs", "--s0", "nan"], "CSHparams.s0 must be a finite number"),
        (["search", "cs", "--rounds", "0"], "CSHparams.rounds must be a positive integer"),
        (["search", "cs", "--density", "0.1", "--s0", "0"], "(--density) sets the initial logit itself; drop --s0"),
        (["prune", "cs", "--density", "1"], "(--density) must be a fraction of the weights strictly between 0 and 1"),
        (["sweep", "cs", "--density", "0.1,0", "--seeds", "0"], "strictly between 0 and 1"),
        (["train", "--dataset", "mnist", "--no-download"], "holds no complete copy of mnist"),
        (["train", "--data-dir", "/nonexistent/fashion"], "--data-dir /nonexistent/fashion is not a folder"),
        (["search", "cs", "--epochs", "1"], "is not before the end of training"),
        (["search", "imp", "--dataset", "cifar10", "--no-download"], "holds no complete copy of cifar10"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(tmp_path, args, needle):
    empty = tmp_path / "empty"
    empty.mkdir()
    extra = ["--data-dir", str(empty)] if "mnist" in args or "cifar10" in args else []
    env_home = {"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "lottery", *args, *extra, "--out", str(tmp_path / "runs")],
                          cwd=tmp_path, env={**os.environ, **env_home}, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]
    # validated before anything is written: no run folder that `lottery report` would list as in progress
    assert not (tmp_path / "runs").exists(), sorted((tmp_path / "runs").rglob("*"))
    assert "Traceback" not in proc.stderr


def test_train_writes_the_run_folder(tmp_path):
    proc = lottery("train", *SYNTH, "--epochs", "2", "--out", "runs", cwd=tmp_path)
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("train_lenet_300_100_synthetic_s0_")
    results = json.loads((folder / "results.json").read_text())
    for key in ("model", "dataset", "seed", "test_accuracy", "val_accuracy", "epochs", "wall_seconds"):
        assert key in results, key
    assert 0.0 <= results["test_accuracy"] <= 1.0 and results["epochs"] == 2.0
    hp = json.loads((folder / "hparams.json").read_text())
    assert hp["training"]["training_steps"] == "2ep" and hp["data"]["dataset"] == "synthetic"
    rows = (folder / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 and rows[0].startswith("step,epoch,lr,train_loss")
    assert "test acc %" in proc.stdout and f"{100 * results['test_accuracy']:.2f}" in proc.stdout
    # Running the same command again reuses the finished run instead of training again.
    again = lottery("train", *SYNTH, "--epochs", "2", "--out", "runs", cwd=tmp_path)
    assert "already finished" in again.stdout + again.stderr


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    """A run killed with SIGKILL after a checkpoint, started again, ends with the same weights."""
    args = ["train", *SYNTH, "--synthetic-train-size", "3000", "--epochs", "6", "--no-progress"]
    lottery(*args, "--out", "ref", cwd=tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lottery", *args, "--out", "killed"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    ckpt = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "killed").glob("*/checkpoint.safetensors"))
        if found:
            ckpt = found[0]
            break
        time.sleep(0.02)
    if ckpt is None or proc.poll() is not None:
        proc.kill()
        pytest.fail("the run finished before a checkpoint could be caught; make it longer")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((tmp_path / "killed").glob("*/results.json"))
    resumed = lottery(*args, "--out", "killed", cwd=tmp_path)
    assert "resumed from" in resumed.stdout + resumed.stderr
    (ref_dir,) = (tmp_path / "ref").iterdir()
    (killed_dir,) = (tmp_path / "killed").iterdir()
    assert ref_dir.name == killed_dir.name  # same hparams, same folder name
    a, b = load_file(ref_dir / "model.safetensors"), load_file(killed_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (ref_dir, killed_dir))
    assert ra["test_accuracy"] == rb["test_accuracy"]


def test_search_cs_prints_table_and_plot(tmp_path):
    proc = lottery("search", "cs", *SYNTH, "--epochs", "2", "--rounds", "2", "--rewind", "1ep", "--s0", "0.05",
                   "--out", "runs", cwd=tmp_path)
    assert "dense vs ticket" in proc.stdout
    out_lines = proc.stdout.splitlines()
    assert any(l.strip().startswith("dense") for l in out_lines)
    assert any(l.strip().startswith("cs") for l in out_lines)
    plot = tmp_path / out_lines[-1].split("plot: ")[1]  # printed relative to the working folder
    assert plot.exists() and plot.stat().st_size > 1000
    (folder,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("search-cs")]
    results = json.loads((folder / "results.json").read_text())
    assert results["method"] == "cs" and 0 < results["density"] <= 1
    assert results["epochs"] == pytest.approx(2 * 2 + 1)  # two search rounds + retraining from 1ep to 2ep
    assert "dense_test_accuracy" in results


def test_listing_commands(tmp_path):
    assert "resnet20" in lottery("models", cwd=tmp_path).stdout
    assert "fashion_lenet" in lottery("presets", cwd=tmp_path).stdout
    assert "fashion-mnist" in lottery("datasets", cwd=tmp_path).stdout


def test_an_explicit_training_length_beats_the_presets_round_length():
    """fashion_lenet's CS rounds are 20 epochs; --training-steps 4it must make them 4 iterations."""
    import lottery.cli.cs as cli_cs

    parser = cli.build_parser()
    job = cli_cs.cs_job(parser.parse_args(["search", "cs", "--training-steps", "4it", "--rounds", "1"]), "ticket")
    assert job.training.training_steps == "4it" and job.cs.round_steps is None
    job = cli_cs.cs_job(parser.parse_args(["search", "cs", "--training-steps", "8it", "--round-steps", "4it"]), "ticket")
    assert job.cs.round_steps == "4it"  # an explicit round length still wins
    assert cli_cs.cs_job(parser.parse_args(["search", "cs"]), "ticket").cs.round_steps == "20ep"  # the preset's


def test_a_new_training_length_changes_the_round_length_and_the_plan_says_so(tmp_path):
    import lottery.cli.cs as cli_cs

    parser = cli.build_parser()
    job = cli_cs.cs_job(parser.parse_args(["search", "cs", "--preset", "fashion_resnet20", "--epochs", "4"]), "ticket")
    assert job.cs.round_steps is None
    # the preset's round milestones go with its round length (they would lie past a shorter round's end)
    job = cli_cs.cs_job(parser.parse_args(["search", "cs", "--preset", "cifar10_resnet20", "--epochs", "2"]), "ticket")
    assert job.cs.round_steps is None and job.cs.round_milestones is None
    proc = lottery("search", "cs", *SYNTH, "--epochs", "2", "--rounds", "1", "--rewind", "1ep", "--no-dense",
                   "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "CS 1 round(s) x 2 epochs (the training length; --round-steps sets it)" in proc.stdout + proc.stderr


def test_the_presets_own_training_length_leaves_the_round_alone():
    """--epochs 16 on fashion_resnet20 (whose training is 16 epochs) is the preset itself: the same CS
    hparams, so the same run folder."""
    import lottery.cli.cs as cli_cs

    parser = cli.build_parser()
    plain = cli_cs.cs_job(parser.parse_args(["search", "cs", "--preset", "fashion_resnet20"]), "ticket")
    same = cli_cs.cs_job(parser.parse_args(["search", "cs", "--preset", "fashion_resnet20", "--epochs", "16"]), "ticket")
    assert same.cs == plain.cs and same.cs.round_steps == "8ep" and same.training == plain.training


def test_two_flags_for_the_training_length_are_a_one_line_error(capsys):
    code = cli.main(["search", "cs", "--epochs", "2", "--training-steps", "100it", "--out", "/nonexistent/never"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--epochs 2 and --training-steps 100it" in err[0]


def test_presets_name_shows_each_group_and_method_as_flags(tmp_path):
    out = lottery("presets", "fashion_resnet20", cwd=tmp_path).stdout
    assert "--model resnet20 --width 0.25" in out
    assert "--training-steps 16ep" in out and "--schedule cosine" in out
    assert "cs:       --lam 1e-08 --rounds 2 --round-steps 8ep --rewind 1ep" in out
    assert "imp:      --rewind 1ep" in out
    paper = lottery("presets", "cifar10_resnet20", cwd=tmp_path).stdout
    assert "--milestones 80ep,120ep" in paper and "--mask-optimizer sgd" in paper
    assert "--temperature-schedule epoch --beta-final 200.0 --prune-ignore '*shortcut*,fc.weight'" in paper
    bad = lottery("presets", "nope", cwd=tmp_path, check=False)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "known presets: " in bad.stderr
