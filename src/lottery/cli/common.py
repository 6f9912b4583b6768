"""What the command families share: flags generated from hparams, the common run flags, option parsing
and one-line errors.

Flags are generated from the hparams dataclasses (open_lth's idea), so a new hparam field is on the
command line without touching any command module. Values come from, in increasing priority: the
dataclass defaults, the ``--preset``, and the flags given. The command modules import from here and
from each other's public functions, never from the entry point (``lottery.cli``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from lottery.errors import ConfigError
from lottery.hparams import DataHparams, Hparams, ModelHparams, TrainingHparams, field_type, scalar_type

DEFAULT_PRESET = "fashion_lenet"


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad flags get one line naming the problem and where to look, not a screen of usage."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


# -- models of the user's own -----------------------------------------------------------------------
def add_import_flag(parser: argparse.ArgumentParser) -> None:
    """Give every command (every parser without subcommands) ``--import MODULE``: the user's own
    models must be known to ``search``, ``export``, ``bench-latency``, ``report`` ... alike."""
    seen: set[int] = set()

    def visit(p: argparse.ArgumentParser) -> None:
        if id(p) in seen:
            return
        seen.add(id(p))
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                           help="import MODULE (a module name, found from the current folder, or a .py file) "
                                "before running, so that the models it registers with @register_model can be "
                                "used; repeatable; sweep workers import it too")
        for action in subs:
            for child in action.choices.values():
                visit(child)

    visit(parser)


def import_user_models(args: argparse.Namespace) -> None:
    from lottery.models.plugins import import_model_modules

    import_model_modules(getattr(args, "imports", None) or ())


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


def _where_and_how_flags(p: argparse.ArgumentParser) -> None:
    """Device, threads, data folder, downloads, progress bars, TensorBoard: how a run runs, not what it is."""
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--data-dir", default=None, help="folder with the data set's files (see README: Data)")
    p.add_argument("--no-download", action="store_true", help="never download data; fail if it is missing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write metrics.csv's rows as TensorBoard events into the run folder (needs lottery[tensorboard])")


def run_option_flags(p: argparse.ArgumentParser) -> None:
    """Where/how to run, for commands that take their hparams from an existing run folder."""
    p.add_argument("--out", type=Path, default=None, help="folder for the new run folder (default: beside RUN_DIR)")
    _where_and_how_flags(p)


def common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None,
                   help=f"reference recipe to start from (default: {DEFAULT_PRESET}); see `lottery presets`")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder for run folders (default: runs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights' initialisation and data order")
    p.add_argument("--epochs", type=int, default=None, help="shorthand for --training-steps Nep (for CS also the round length when N differs from the preset's, unless --round-steps is given)")
    _where_and_how_flags(p)
    add_hparams_flags(p, DataHparams, "data")
    add_hparams_flags(p, ModelHparams, "model")
    add_hparams_flags(p, TrainingHparams, "training")


def base_groups(args: argparse.Namespace):
    from lottery.presets import get_preset

    preset = get_preset(args.preset or DEFAULT_PRESET)
    data = hparams_from_args(args, DataHparams, preset.data)
    model = hparams_from_args(args, ModelHparams, preset.model)
    training = hparams_from_args(args, TrainingHparams, preset.training)
    if args.epochs is not None:
        if args.epochs <= 0:
            raise ConfigError(f"--epochs must be a positive integer, got {args.epochs}")
        if "TrainingHparams.training_steps" in vars(args):
            raise ConfigError(f"--epochs {args.epochs} and --training-steps {training.training_steps} both set the "
                              "training length; give one of them")
        training = training.replace(training_steps=f"{args.epochs}ep")
    return preset, data, model, training


def training_length_given(args: argparse.Namespace) -> bool:
    """Whether the command line itself set the training length (``--epochs`` or ``--training-steps``):
    then a preset's own lengths derived from its recipe (a CS round length) give way to it."""
    return args.epochs is not None or "TrainingHparams.training_steps" in vars(args)


def run_options(args: argparse.Namespace):
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


def validate_names(data: DataHparams, model: ModelHparams) -> None:
    """Fail on unknown names before any data is read, with the list of known names."""
    from lottery.data import dataset_info
    from lottery.models import get_model_spec

    get_model_spec(model.model)
    dataset_info(data.dataset)


def is_main_rank() -> bool:
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
