"""`lottery models`, `presets`, `datasets`: what is registered."""

from __future__ import annotations

import argparse



def cmd_models(args: argparse.Namespace) -> int:
    from lottery.models import get_model_spec, model_names

    for name in model_names():
        spec = get_model_spec(name)
        print(f"{name:16s} input {'x'.join(map(str, spec.input_shape)):10s} {spec.description}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from lottery.presets import PRESETS, get_preset

    if args.name is None:
        for name, p in sorted(PRESETS.items()):
            print(f"{name:20s} {p.description}")
        return 0
    preset = get_preset(args.name)
    print(f"{preset.name}: {preset.description}")
    for title, group in (("data", preset.data), ("model", preset.model), ("training", preset.training)):
        print(f"  {title + ':':10s}{_as_flags(group.to_dict())}")
    if preset.methods or preset.method_models:
        print("  per method (on top of its own defaults; `lottery search METHOD --help` lists every flag):")
    for method in sorted(set(preset.methods) | set(preset.method_models)):
        print(f"    {method + ':':10s}{_as_flags({**preset.methods.get(method, {}), **preset.method_models.get(method, {})})}")
    return 0


def _as_flags(values: dict) -> str:
    """Settings written as the command-line flags that set them (None: left to the built-in default)."""
    import shlex

    from lottery.cli.common import _flag

    out = []
    for key, value in values.items():
        flag = _flag(key)
        if value is None or value == ():
            continue
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (tuple, list)):
            out.append(f"{flag} {shlex.quote(','.join(map(str, value)))}")
        else:
            out.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(out) or "(none)"


def cmd_datasets(args: argparse.Namespace) -> int:
    from lottery.data import dataset_info, dataset_names

    for name in dataset_names():
        info = dataset_info(name)
        shape = getattr(info, "input_shape", None)
        print(f"{name:14s} input {'x'.join(map(str, shape)) if shape else '?':10s} classes {getattr(info, 'num_classes', '?')}")
    return 0


def register(sub) -> None:
    sub.add_parser("models", help="list the registered models").set_defaults(func=cmd_models)
    p = sub.add_parser("presets", help="list the reference recipes, or show one's settings",
                       description="Without NAME: every preset in a line. With NAME: its settings as the flags "
                                   "that set them, per group and per method.")
    p.add_argument("name", nargs="?", default=None, metavar="NAME", help="a preset to show in full")
    p.set_defaults(func=cmd_presets)
    sub.add_parser("datasets", help="list the data sets").set_defaults(func=cmd_datasets)
