"""Damaged records: results.json, metrics.csv or hparams.json of a finished run changed outside lottery.

Running the same command again refuses with one line naming the damaged file (never a traceback); doing
what the line says rebuilds the run exactly. (A results.json whose numbers disagree with its mask is refused
the same way: tests/pipelines/test_structured_results.py.) ``lottery report`` leaves such a run out with one warning line and reports the others.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import faultkit as fk  # noqa: E402
from faultkit import procs  # noqa: E402,F401  (the shared fixture)

CS = ["search", "cs", *fk.SYNTH, "--epochs", "1", "--rounds", "1", "--rewind", "2it", "--density", "0.3", "--no-dense"]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


DAMAGES = {
    # file, how, what the refusal names
    "results-truncated": ("results.json", _truncate, "results.json is unreadable"),
    "metrics-truncated": ("metrics.csv", _truncate, "metrics.csv is damaged (line"),
    "hparams-truncated": ("hparams.json", _truncate, "hparams.json is unreadable"),
}


@pytest.fixture(scope="module")
def finished(procs, tmp_path_factory):
    """Two finished CS searches (seeds 0 and 1) in one --out."""
    out = tmp_path_factory.mktemp("runs")
    for seed in ("0", "1"):
        o = procs.run([*CS, "--seed", seed, "--out", str(out)])
        assert o.exitcode == 0, o.log[-3000:]
    return out


def _error_lines(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if ln.startswith("lottery: error:")]


@pytest.mark.parametrize("case", list(DAMAGES))
def test_a_damaged_record_is_refused_in_one_line_and_rebuilt_as_told(procs, finished, tmp_path, case):
    name, damage, needle = DAMAGES[case]
    out = tmp_path / "runs"
    shutil.copytree(finished, out)
    folders = sorted(out.glob("search-cs_*"))
    folder = next(f for f in folders if json.loads((f / "hparams.json").read_text())["seed"] == 0)
    original = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}
    damage(folder / name)

    again = procs.run([*CS, "--seed", "0", "--out", str(out)])
    assert again.exitcode == 2 and "Traceback" not in again.log, again.log[-3000:]
    (line,) = _error_lines(again.log)
    assert needle in line and str(folder) in line, line

    report = procs.run(["report", str(out), "--out", str(tmp_path / "report")])
    assert report.exitcode == 0 and "Traceback" not in report.log, report.log[-3000:]
    warnings = [ln for ln in report.log.splitlines() if ln.startswith("lottery: warning:") and folder.name in ln]
    if name == "metrics.csv":
        assert warnings == []  # the report reads results.json, which is whole
    else:
        assert len(warnings) == 1 and "left out" in warnings[0], report.log[-3000:]
        other = next(f for f in folders if f != folder)
        assert other.name not in "\n".join(warnings)

    # Doing what the line says rebuilds the run, identical to what it was.
    if name == "hparams.json":
        (folder / name).write_bytes(original[Path(name)])  # "restore that file": the run is whole again
    else:
        for gone in ("results.json", "metrics.csv"):
            (folder / gone).unlink(missing_ok=True)
    final = procs.run([*CS, "--seed", "0", "--out", str(out)])
    assert final.exitcode == 0, final.log[-3000:]
    for rel, data in original.items():
        now = folder / rel
        if rel.suffix == ".safetensors":
            assert now.read_bytes() == data, rel
        elif rel.name == "results.json":
            strip = lambda d: {k: v for k, v in d.items() if "wall" not in k and not k.endswith("_dir")}  # noqa: E731
            assert strip(json.loads(now.read_text())) == strip(json.loads(data)), rel
        elif rel.name == "metrics.csv":
            (tmp_path / "metrics_before.csv").write_bytes(data)
            assert fk.metrics_without_time(now) == fk.metrics_without_time(tmp_path / "metrics_before.csv"), rel
