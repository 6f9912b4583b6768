"""The ``lottery`` command.

Flags are generated from the hparams dataclasses (open_lth's idea), so a new hparam field is on the
command line without touching this file. Values come from, in increasing priority: the dataclass
defaults, the ``--preset``, and the flags given.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from lottery.errors import ConfigError, LotteryError
from lottery.hparams import DataHparams, Hparams, ModelHparams, TrainingHparams, field_type, scalar_type

DEFAULT_PRESET = "fashion_lenet"


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad flags get one line naming the problem and where to look, not a screen of usage."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


# -- flags from dataclasses --------------------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _converter(tp: type, is_tuple: bool):
    def convert(text: str):
        def one(t: str):
            t = t.strip()
            if tp is bool:
                return _parse_bool(t)
            if tp is int:
                try:
                    return int(t)
                except ValueError:
                    raise argparse.ArgumentTypeError(f"expected an integer, got {t!r}") from None
            if tp is float:
                try:
                    return float(t)
                except ValueError:
                    raise argparse.ArgumentTypeError(f"expected a number, got {t!r}") from None
            return t

        if is_tuple:
            return tuple(one(p) for p in text.split(",") if p.strip())
        return one(text)

    return convert


def add_hparams_flags(parser: argparse.ArgumentParser, cls: type[Hparams], title: str, skip: Sequence[str] = ()) -> None:
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in skip:
            continue
        tp, optional, is_tuple = scalar_type(field_type(cls, f.name))
        help_text = cls._help.get(f.name, "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if "default" not in help_text:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            help_text = f"{help_text} (built-in default: {shown}; a --preset may set another)"
        if tp is bool and not is_tuple:
            group.add_argument(_flag(f.name), dest=f"{cls.__name__}.{f.name}", action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            metavar = f"{tp.__name__.upper()},..." if is_tuple else tp.__name__.upper()
            group.add_argument(_flag(f.name), dest=f"{cls.__name__}.{f.name}", type=_converter(tp, is_tuple),
                               default=argparse.SUPPRESS, metavar=metavar, help=help_text)


def hparams_from_args(args: argparse.Namespace, cls: type[Hparams], base: Hparams | None = None) -> Hparams:
    values = dict(base.to_dict()) if base is not None else {}
    prefix = f"{cls.__name__}."
    for key, value in vars(args).items():
        if key.startswith(prefix):
            values[key[len(prefix):]] = value
    return cls.from_dict(values)


def _common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None,
                   help=f"reference recipe to start from (default: {DEFAULT_PRESET}); see `lottery presets`")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder for run folders (default: runs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights' initialisation and data order")
    p.add_argument("--epochs", type=int, default=None, help="shorthand for --training-steps Nep (for CS also the round length, unless --round-steps is given)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--data-dir", default=None, help="folder with the data set's files (see README: Data)")
    p.add_argument("--no-download", action="store_true", help="never download data; fail if it is missing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write metrics.csv's rows as TensorBoard events into the run folder (needs lottery[tensorboard])")
    add_hparams_flags(p, DataHparams, "data")
    add_hparams_flags(p, ModelHparams, "model")
    add_hparams_flags(p, TrainingHparams, "training")


def _base_groups(args: argparse.Namespace):
    from lottery.presets import get_preset

    preset = get_preset(args.preset or DEFAULT_PRESET)
    data = hparams_from_args(args, DataHparams, preset.data)
    model = hparams_from_args(args, ModelHparams, preset.model)
    training = hparams_from_args(args, TrainingHparams, preset.training)
    if args.epochs is not None:
        if args.epochs <= 0:
            raise ConfigError(f"--epochs must be a positive integer, got {args.epochs}")
        training = training.replace(training_steps=f"{args.epochs}ep")
    return preset, data, model, training


def _options(args: argparse.Namespace):
    from lottery.experiment import RunOptions

    if args.threads is not None:
        if args.threads <= 0:
            raise ConfigError(f"--threads must be positive, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    from lottery import distributed

    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise ConfigError(f"--data-dir {args.data_dir} is not a folder; give the folder that holds the data set's files")
    device = args.device
    if distributed.init_from_env(device):  # started by torchrun: one process per rank
        device = distributed.local_device(device)
    main_rank = distributed.is_main()
    return RunOptions(out=args.out, data_dir=args.data_dir, device=device,
                      progress=main_rank and not args.no_progress and sys.stderr.isatty(),
                      download=not args.no_download, log=None if main_rank else (lambda msg: None),
                      tensorboard=bool(getattr(args, "tensorboard", False)))


def _validate_names(data: DataHparams, model: ModelHparams) -> None:
    """Fail on unknown names before any data is read, with the list of known names."""
    from lottery.data import dataset_info
    from lottery.models import get_model_spec

    get_model_spec(model.model)
    dataset_info(data.dataset)


# -- commands ------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from lottery.experiment import DenseJob, train_dense
    from lottery.report import print_table

    _, data, model, training = _base_groups(args)
    _validate_names(data, model)
    options = _options(args)
    results = train_dense(DenseJob(data, model, training, seed=args.seed), options)
    if not _is_main_rank():
        return 0
    print_table([results], title="dense training")
    print(f"run folder: {results['run_dir']}")
    return 0


def _cs_job(args: argparse.Namespace, mode: str):
    from lottery.methods.cs import CSHparams
    from lottery.pipelines.cs import CSJob

    preset, data, model, training = _base_groups(args)
    model = preset.model_for("cs", model, given={k.split(".", 1)[1] for k in vars(args) if k.startswith("ModelHparams.")})
    _validate_names(data, model)
    cs = hparams_from_args(args, CSHparams, CSHparams.from_dict(preset.methods.get("cs", {})))
    if args.epochs is not None and "CSHparams.round_steps" not in vars(args):
        # --epochs N sets the length of everything: a round is then as long as the training.
        cs = cs.replace(round_steps=None)
    return CSJob(data, model, training, cs, seed=args.seed, mode=mode, dense_reference=not args.no_dense)


def cmd_search_cs(args: argparse.Namespace, mode: str = "ticket") -> int:
    from lottery.pipelines.cs import run_cs
    from lottery.report import plot_run_summary, print_table

    job = _cs_job(args, mode)
    options = _options(args)
    options.strict = bool(getattr(args, "strict", False))
    results = run_cs(job, options)
    if not _is_main_rank():
        return 0
    rows = []
    if "dense_test_accuracy" in results:
        rows.append({"method": "dense", "model": results["model"], "dataset": results["dataset"],
                     "seed": results["seed"], "density": 1.0, "test_accuracy": results["dense_test_accuracy"],
                     **read_dense_costs(results)})
    rows.append(results)
    print_table(rows, title=f"CS {'ticket search' if mode == 'ticket' else 'pruning'}: dense vs {'ticket' if mode == 'ticket' else 'pruned network'}")
    plot = plot_run_summary(options.out, results)
    print(f"run folder: {results['run_dir']}")
    print(f"plot: {plot}")
    return 0


def _is_main_rank() -> bool:
    from lottery.distributed import is_main

    return is_main()


def read_dense_costs(results: dict) -> dict:
    """Epochs and wall time of the dense reference run, from its own results.json."""
    from lottery.io import read_json

    try:
        dense = read_json(Path(results["dense_run_dir"]) / "results.json")
    except (KeyError, OSError, ValueError):
        return {}
    return {"epochs": dense.get("epochs"), "wall_seconds": dense.get("wall_seconds")}


def _add_cs_commands(sub) -> None:
    from lottery.methods.cs import CSHparams

    search = sub.add_parser("search", help="lottery-ticket search (cs, imp, imp-c, l0)",
                            description="Find a lottery ticket: a mask plus rewind-point weights, retrained.")
    search_sub = search.add_subparsers(dest="method", metavar="METHOD", parser_class=OneLineErrorParser)
    search_sub.required = True
    prune = sub.add_parser("prune", help="pruning (cs, magnitude, lrr, finetune, l0, gmp)", description="Prune a trained network.")
    prune_sub = prune.add_subparsers(dest="method", metavar="METHOD", parser_class=OneLineErrorParser)
    prune_sub.required = True
    for parent, mode in ((search_sub, "ticket"), (prune_sub, "prune")):
        p = parent.add_parser(
            "cs", help="Continuous Sparsification",
            description="Continuous Sparsification (Savarese et al. 2020): learns the mask while training; "
            + ("the mask applied to the rewind-point weights is retrained as a ticket."
               if mode == "ticket" else "the final weights times the mask, optionally fine-tuned."),
        )
        _common_flags(p)
        add_hparams_flags(p, CSHparams, "continuous sparsification")
        p.add_argument("--no-dense", action="store_true", help="do not train the dense reference network")
        p.add_argument("--strict", action="store_true",
                       help="stop with an error when a search round's mask did not converge (default: a warning)")
        p.set_defaults(func=lambda a, m=mode: cmd_search_cs(a, m))
    return search_sub, prune_sub


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


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="lottery",
        description="Sparse networks: Continuous Sparsification, lottery tickets, pruning baselines.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    sub.required = True

    p = sub.add_parser("train", help="train a dense network", description="Train a dense network.")
    _common_flags(p)
    p.set_defaults(func=cmd_train)

    sub.add_parser("models", help="list the registered models").set_defaults(func=cmd_models)
    sub.add_parser("presets", help="list the reference recipes").set_defaults(func=cmd_presets)
    sub.add_parser("datasets", help="list the data sets").set_defaults(func=cmd_datasets)

    search_sub, prune_sub = _add_cs_commands(sub)
    from lottery.cli_imp import register as register_imp

    register_imp(search_sub, prune_sub, sub, _common_flags)
    from lottery.cli_l0gmp import register as register_l0gmp

    register_l0gmp(search_sub, prune_sub, _common_flags)
    from lottery.cli_sweep import register as register_sweep

    register_sweep(sub, _common_flags)
    from lottery.cli_structured import register as register_structured

    register_structured(sub, _common_flags)
    return parser


def _version() -> str:
    from lottery import __version__

    return f"lottery {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LotteryError as e:
        print(f"lottery: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lottery: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        from lottery.distributed import is_distributed

        if is_distributed():
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
