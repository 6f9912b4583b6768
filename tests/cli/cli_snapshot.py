"""The command line's shape as data: every command path with its flags (option strings, destination,
default, choices, help). tests/cli/test_cli_shape.py compares it against cli_flags.json, written before
the command modules were reorganised, so a refactor cannot drop, rename or change a flag unnoticed.

    python tests/cli/cli_snapshot.py > tests/cli/cli_flags.json    # after a deliberate change of the CLI
"""

from __future__ import annotations

import argparse
import json


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...], out: dict) -> None:
    flags = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                _walk(sub, path + (name,), out)
            continue
        flags.append({
            "options": list(action.option_strings), "dest": action.dest,
            "default": action.default if isinstance(action.default, (str, int, float, bool, type(None))) else repr(action.default),
            "choices": sorted(map(str, action.choices)) if action.choices else None,
            "help": action.help, "nargs": action.nargs if isinstance(action.nargs, (str, int, type(None))) else repr(action.nargs),
        })
    out[" ".join(path) or "lottery"] = {"description": parser.description, "flags": flags}


def snapshot() -> dict:
    from lottery import cli

    out: dict = {}
    _walk(cli.build_parser(), (), out)
    return out


if __name__ == "__main__":
    print(json.dumps(snapshot(), indent=1, sort_keys=True, default=str))
