"""The tutorial's example (docs/tutorial.md) runs end to end: a user's own registered model, CS tickets
and IMP through a sweep, then the report's table and plots."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_own_model_example_runs_and_reports(tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "own_model_tickets.py"), "--quick",
                           "--workers", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "report" / "report.csv").open()))
    methods = {r["method"] for r in rows}
    assert {"dense", "cs ticket", "imp"} <= methods, methods
    assert all(r["model"] == "my_mlp" for r in rows)
    cs = [r for r in rows if r["method"] == "cs ticket"]
    assert len(cs) == 2 and all(0 < float(r["density"]) <= 1 for r in cs)
    assert (out / "report" / "accuracy_vs_density_my_mlp_synthetic.png").stat().st_size > 1000
    assert "sparsest matching ticket" in proc.stdout
