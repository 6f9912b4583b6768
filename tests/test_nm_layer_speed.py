"""benchmarks/nm_layer_speed.py: the CPU dry run checks its 2:4 masks; without a supporting GPU it says so in
one line and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nm_layer_speed.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_dry_run_checks_the_masks_on_the_cpu():
    r = _run("--dry-run", "--sizes", "64,128")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["size 64: 2:4, 2048 of 4096 weights kept",
                                     "size 128: 2:4, 8192 of 16384 weights kept"]


def test_without_a_supporting_gpu_it_prints_one_line_and_exits_0():
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        return  # the timing itself is a GPU run, not a unit test
    r = _run("--sizes", "64")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1 and "nothing timed" in r.stdout
