"""benchmarks/resnet_gpu_step.py on the CPU with the smallest settings: each mode trains and is timed, the
GPU-only graph mode is left out there, and a mistyped mode is refused (RESULTS.md quotes its GPU run)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("resnet_gpu_step_under_test", BENCHMARKS / "resnet_gpu_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_each_mode_is_timed_and_graph_is_left_out_on_cpu(bench, tmp_path, capsys):
    out = tmp_path / "step.json"
    args = ["--device", "cpu", "--width", "0.125", "--batch", "8", "--steps", "2", "--repeats", "2", "--warmup", "1",
            "--modes", "eager,masked,graph", "--json", str(out)]
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    assert [r["mode"] for r in result["modes"]] == ["eager", "masked"]
    for row in result["modes"]:
        assert row["ms_per_step"] > 0 and len(row["repeats_ms"]) == 2 and row["finite_after"]
        assert row["epochs_per_s"] == pytest.approx(1000 / row["ms_per_step"] / 430, rel=0.01)


def test_an_unknown_mode_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--modes", "eagre"])
    assert "unknown mode 'eagre'" in capsys.readouterr().err
