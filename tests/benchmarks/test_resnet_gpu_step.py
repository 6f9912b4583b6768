"""benchmarks/resnet_gpu_step.py on the CPU with the smallest settings: each mode trains and is timed, the
GPU-only graph modes are left out there, a stack's rate counts its member epochs, and a mistyped mode or
an empty stack is refused (RESULTS.md quotes its GPU run)."""

from __future__ import annotations

import json

import pytest

from benchmark_module import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("resnet_gpu_step.py") as module:
        yield module


def test_each_mode_is_timed_and_graph_is_left_out_on_cpu(bench, tmp_path, capsys):
    out = tmp_path / "step.json"
    args = ["--device", "cpu", "--width", "0.125", "--batch", "8", "--steps", "2", "--repeats", "2", "--warmup", "1",
            "--modes", "eager,masked,graph,stacked,stacked_graph", "--stack", "2", "--json", str(out)]
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    assert [r["mode"] for r in result["modes"]] == ["eager", "masked", "stacked"]
    assert [r["networks"] for r in result["modes"]] == [1, 1, 2]
    for row in result["modes"]:
        assert row["ms_per_step"] > 0 and len(row["repeats_ms"]) == 2 and row["finite_after"]
        assert row["epochs_per_s"] == pytest.approx(row["networks"] * 1000 / row["ms_per_step"] / 430, rel=0.01)


def test_an_unknown_mode_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--modes", "eagre"])
    assert "unknown mode 'eagre'" in capsys.readouterr().err


def test_an_empty_stack_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--modes", "stacked", "--stack", "0"])
    assert "--stack must be at least 1, got 0" in capsys.readouterr().err
