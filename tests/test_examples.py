"""The tutorial's examples (docs/tutorial.md) run end to end: a user's own registered model, CS tickets
and IMP through a sweep, then the report's table and plots; and CS inside a loop of one's own (rewind point, ticket)."""

from __future__ import annotations

import csv
import os
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


def _section_code(path: Path, heading: str) -> str:
    """The ```python blocks of one section of a Markdown file, joined."""
    lines = path.read_text().splitlines()
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    blocks, inside = [], False
    for line in lines[start:end]:
        if line.strip() == "```python":
            inside = True
        elif line.strip() == "```" and inside:
            inside = False
        elif inside:
            blocks.append(line)
    return "\n".join(blocks)


def test_tutorial_own_loop_example_runs(tmp_path):
    """docs/tutorial.md's CS-in-your-own-loop example (search, rewind point, ticket) runs as printed."""
    code = _section_code(ROOT / "docs" / "tutorial.md", "## Without registering: CS inside your own loop")
    assert "save_rewind_point" in code and "ticket_from" in code and "on_round_start" in code
    script = tmp_path / "own_loop.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", str(script)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ticket: density 0.20" in proc.stdout
