"""The command line keeps its shape: every command and flag as recorded in cli_flags.json (written before
the command modules moved into the lottery.cli package)."""

from __future__ import annotations

import json
from pathlib import Path

from cli_snapshot import snapshot


def test_every_command_and_flag_is_unchanged():
    recorded = json.loads((Path(__file__).parent / "cli_flags.json").read_text())
    now = json.loads(json.dumps(snapshot(), sort_keys=True, default=str))
    assert sorted(now) == sorted(recorded), "commands added or removed"
    for command in recorded:
        assert now[command] == recorded[command], f"`lottery {command}` changed; if on purpose, rewrite cli_flags.json (see cli_snapshot.py)"


def test_the_entry_point_imports_no_command_module_at_import_time():
    """lottery.cli's own module imports only lottery.cli.common; the command modules register lazily."""
    import ast

    import lottery.cli as entry

    tree = ast.parse(Path(entry.__file__).read_text())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    modules = {n.module for n in top_level if isinstance(n, ast.ImportFrom)}
    assert {m for m in modules if m and m.startswith("lottery.cli")} == {"lottery.cli.common"}
