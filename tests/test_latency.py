"""The latency harness: report structure, interleaving, fixed threads, ratios (not speed itself)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lottery.errors import ConfigError
from lottery.latency import LatencySettings, fixed_threads, format_latency_table, measure_latency


def test_report_has_medians_and_ratios_per_batch_size_and_variant():
    torch.manual_seed(0)
    variants = {"dense": nn.Linear(16, 8), "small": nn.Linear(16, 2)}
    settings = LatencySettings(batch_sizes=(1, 4), warmup=1, repeats=5, threads=1)
    report = measure_latency(variants, (16,), settings)
    assert report["baseline"] == "dense"
    assert report["settings"]["batch_sizes"] == [1, 4] and report["settings"]["threads"] == 1
    assert [(r["batch"], r["variant"]) for r in report["rows"]] == [(1, "dense"), (1, "small"), (4, "dense"), (4, "small")]
    for r in report["rows"]:
        assert r["timings"] == 5
        assert 0 < r["p25_ms"] <= r["median_ms"] <= r["p75_ms"]
    for b in ("1", "4"):
        med = {r["variant"]: r["median_ms"] for r in report["rows"] if str(r["batch"]) == b}
        assert report["speedup"][b]["dense"] == 1.0 and report["time_saved"][b]["dense"] == 0.0
        assert report["speedup"][b]["small"] == pytest.approx(med["dense"] / med["small"])
        assert report["time_saved"][b]["small"] == pytest.approx(1 - med["small"] / med["dense"])
    table = format_latency_table(report)
    assert table.count("\n| 1 |") == 2 and "speed-up" in table
    assert "small" in format_latency_table(report, markdown=False)


def test_variants_are_interleaved_with_a_rotating_order():
    calls = []

    def make(name):
        return lambda x: calls.append((name, x.shape[0]))

    variants = {"a": make("a"), "b": make("b"), "c": make("c")}
    measure_latency(variants, (2,), LatencySettings(batch_sizes=(3,), warmup=2, repeats=4), baseline="b")
    timed = [n for n, _ in calls[6:]]  # after 2 warm-up rounds of 3 variants
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert all(b == 3 for _, b in calls)


def test_threads_are_fixed_during_the_measurement_and_restored():
    seen = []
    before = torch.get_num_threads()
    measure_latency({"x": lambda x: seen.append(torch.get_num_threads())}, (1,),
                    LatencySettings(batch_sizes=(1,), warmup=0, repeats=2, threads=2))
    assert seen == [2, 2] and torch.get_num_threads() == before
    with fixed_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_bad_arguments():
    with pytest.raises(ConfigError):
        measure_latency({}, (1,))
    with pytest.raises(ConfigError):
        measure_latency({"a": lambda x: x}, (1,), baseline="b")
    with pytest.raises(ConfigError):
        LatencySettings(batch_sizes=(0,))
    with pytest.raises(ConfigError):
        LatencySettings(repeats=0)
