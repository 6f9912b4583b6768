"""A model of the user's own on the command line: ``--import MODULE`` on every command, sweep workers
included, and a run folder that says which module its model came from."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SYNTH = ["--dataset", "synthetic", "--synthetic-shape", "1,8,8", "--synthetic-train-size", "320",
         "--synthetic-test-size", "64", "--val-size", "64", "--batch-size", "32", "--threads", "1", "--no-progress"]

MODULE = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from lottery.models import register_model


    class TinyCNN(nn.Module):
        def __init__(self, input_shape, num_classes):
            super().__init__()
            c, h, w = input_shape
            self.conv = nn.Conv2d(c, 4, 3, padding=1)
            self.fc = nn.Linear(4 * h * w, num_classes)

        def forward(self, x):
            return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


    @register_model("tiny_cnn", input_shape=(1, 8, 8))
    def tiny_cnn(input_shape, num_classes):
        return TinyCNN(input_shape, num_classes)
""")


def _lottery(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The console script when installed (its sys.path does not start at the current folder, unlike
    ``python -m``), else ``python -m lottery``."""
    script = Path(sys.executable).parent / "lottery"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lottery"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture
def user_folder(tmp_path):
    (tmp_path / "tiny_models.py").write_text(MODULE)
    return tmp_path


def test_search_sweep_and_export_with_the_users_model(user_folder):
    search = _lottery("search", "cs", "--import", "tiny_models", "--model", "tiny_cnn", *SYNTH, "--epochs", "2",
                      "--rounds", "1", "--rewind", "1it", "--out", "runs", cwd=user_folder)
    assert search.returncode == 0, search.stderr
    run = next((user_folder / "runs").glob("search-cs_tiny_cnn_*"))
    assert '"model_modules": [\n    "tiny_models"' in (run / "lottery.json").read_text()

    # spawned sweep workers import the module too (two workers, so the jobs run in child processes)
    sweep = _lottery("sweep", "cs", "--import", "tiny_models", "--model", "tiny_cnn", *SYNTH, "--epochs", "2",
                     "--rounds", "1", "--rewind", "1it", "--seeds", "1,2", "--workers", "2", "--out", "swept",
                     cwd=user_folder)
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    assert len(list((user_folder / "swept").glob("search-cs_tiny_cnn_*/results.json"))) == 2

    # a later command without the flag is told which one the run was made with
    bare = _lottery("export", str(run), "--to", "csr", "--out", "exp", cwd=user_folder)
    assert bare.returncode == 2
    assert bare.stderr.strip().splitlines() == [
        f"lottery: error: the model 'tiny_cnn' of {run} is not registered; that run was made with "
        "--import tiny_models: give the same flag(s) here"]
    exported = _lottery("export", str(run), "--import", "tiny_models", "--to", "csr", "--out", "exp", cwd=user_folder)
    assert exported.returncode == 0, exported.stderr
    assert (user_folder / "exp" / "model.json").is_file()
    timed = _lottery("bench-latency", str(run), "--import", "tiny_models", "--batch-sizes", "4", "--warmup", "1",
                     "--repeats", "3", cwd=user_folder)
    assert timed.returncode == 0, timed.stderr
    assert "masked" in timed.stdout
    refilled = _lottery("structure", "refill", str(run), "--import", "tiny_models", "--no-progress", cwd=user_folder)
    assert refilled.returncode == 0, refilled.stderr
    assert list((user_folder / "runs").glob("structure-*/results.json"))



def test_without_the_flag_the_error_says_how_to_register(user_folder):
    proc = _lottery("train", "--model", "tiny_cnn", *SYNTH, "--out", "runs", cwd=user_folder)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "unknown model 'tiny_cnn'" in line and "--import MODULE" in line
    assert not (user_folder / "runs").exists()


def test_every_command_takes_the_flag():
    from cli_snapshot import snapshot

    commands = snapshot()
    leaves = [c for c in commands if c != "lottery" and not any(o.startswith(c + " ") for o in commands)]
    assert len(leaves) > 20
    missing = [c for c in leaves if not any("--import" in f["options"] for f in commands[c]["flags"])]
    assert not missing, f"commands without --import: {missing}"
