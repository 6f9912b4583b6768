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
    from lottery.presets import PRESETS

    for name, p in sorted(PRESETS.items()):
        print(f"{name:20s} {p.description}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from lottery.data import dataset_info, dataset_names

    for name in dataset_names():
        info = dataset_info(name)
        shape = getattr(info, "input_shape", None)
        print(f"{name:14s} input {'x'.join(map(str, shape)) if shape else '?':10s} classes {getattr(info, 'num_classes', '?')}")
    return 0


def register(sub) -> None:
    sub.add_parser("models", help="list the registered models").set_defaults(func=cmd_models)
    sub.add_parser("presets", help="list the reference recipes").set_defaults(func=cmd_presets)
    sub.add_parser("datasets", help="list the data sets").set_defaults(func=cmd_datasets)
