"""``lottery sweep ...`` and ``lottery report ...``: many runs at once, and the table and plots of many runs.

``lottery sweep cs`` takes the flags of ``lottery search cs``, but any hparam flag may list several
values; the sweep runs every combination, times every seed of ``--seeds``::

    lottery sweep cs --preset fashion_lenet --s0 0.05,0,-0.05,-0.1 --seeds 0,1,2 \\
        --models lenet_300_100,conv2 --workers 2 [--backend local|ray] [--ray-address ADDR]

Scalar hparams separate their values with commas. Hparams that are themselves lists (``--milestones``,
``--round-milestones``, ``--prune-ignore``, ``--synthetic-shape``) already use commas inside one value,
so their alternatives are separated by ``;`` (quote it in the shell): ``--milestones '80ep,120ep;60ep,90ep'``
sweeps two schedules; ``--milestones 80ep,120ep`` is one value, as in ``search cs``. Boolean flags
(``--nesterov``/``--no-nesterov``) take one value.

``lottery sweep train|imp|imp-c|lrr|finetune|magnitude`` do the same for the other job kinds, with the
flags of their method's hparams.

``lottery report RUN_DIRS... [--out DIR] [--layers RUN_DIR]`` summarises finished runs (see
:func:`lottery.report.write_report`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from lottery.cli.common import (
    OneLineErrorParser, add_hparams_flags, base_groups, hparams_from_args, run_options, validate_names,
)
from lottery.errors import ConfigError


def _group_of_class(cls_name: str) -> str:
    """The flags' dest is ``<hparams class>.<field>``; the sweep's grid names ``<group>.<field>``."""
    from lottery.sweep import GROUP_CLASSES

    for group, ref in GROUP_CLASSES.items():
        if ref.split(":")[1] == cls_name:
            return group
    raise ConfigError(f"no hparams group for {cls_name}")  # pragma: no cover - flags come from GROUP_CLASSES


# `lottery sweep <command>` for the job kinds whose flags are just their method's hparams group.
_METHOD_COMMANDS = (
    ("imp", "imp", "iterative magnitude pruning", "IMP; with --rewind > 0: IMP-R"),
    ("imp-c", "imp-c", "IMP-C", "IMP continuing training between levels (no rewinding)"),
    ("lrr", "lrr", "learning-rate rewinding", "iterative pruning with learning-rate rewinding"),
    ("finetune", "finetune", "iterative pruning with fine-tuning", "iterative pruning with fine-tuning"),
    ("magnitude", "magnitude", "one-shot magnitude pruning", "one-shot magnitude pruning"),
    ("l0", "l0", "stochastic L0 ticket search", "stochastic L0 (hard concrete) ticket searches"),
    ("l0-prune", "l0-prune", "stochastic L0 pruning", "stochastic L0 (hard concrete) pruning"),
    ("gmp", "gmp", "gradual magnitude pruning", "gradual magnitude pruning (Zhu & Gupta 2017)"),
)


class Alternatives(tuple):
    """The values one flag was given in a sweep (a tuple, so argparse stores it untouched)."""


def _listable(convert: Callable[[str], Any], is_tuple: bool, flag: str) -> Callable[[str], Alternatives]:
    sep = ";" if is_tuple else ","

    def parse(text: str) -> Alternatives:
        parts = text.split(sep)
        if not is_tuple:
            parts = [p for p in parts if p.strip()]
            if not parts:
                raise argparse.ArgumentTypeError(f"{flag} needs at least one value")
        values = [convert(p) for p in parts]
        seen: list[Any] = []
        for v in values:
            if v not in seen:
                seen.append(v)
        return Alternatives(seen)

    parse.__name__ = getattr(convert, "__name__", "value")
    parse.listable = True  # type: ignore[attr-defined]
    return parse


def _make_listable(parser: argparse.ArgumentParser) -> None:
    """Let every non-boolean hparam flag of ``parser`` take several values (see the module docstring)."""
    from lottery.hparams import field_type, scalar_type
    from lottery.sweep import _resolve, GROUP_CLASSES

    classes = {ref.split(":")[1]: ref for ref in GROUP_CLASSES.values()}
    for action in parser._actions:
        if "." not in action.dest or action.type is None or getattr(action.type, "listable", False):
            continue
        cls_name, fname = action.dest.split(".", 1)
        if cls_name not in classes:
            continue
        cls = _resolve(classes[cls_name])
        _, _, is_tuple = scalar_type(field_type(cls, fname))
        flag = action.option_strings[0] if action.option_strings else action.dest
        action.type = _listable(action.type, is_tuple, flag)
        action.help = (action.help or "") + (" [';'-separated alternatives to sweep]" if is_tuple
                                             else " [comma-separated values to sweep]")


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative seeds, got {text!r}")
    return list(dict.fromkeys(seeds))


def _stack_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def _sweep_flags(p: argparse.ArgumentParser) -> None:
    from lottery.sweep import BACKENDS

    g = p.add_argument_group("sweep")
    g.add_argument("--seeds", type=_seed_list, default=None, help="comma-separated seeds (default: --seed)")
    g.add_argument("--models", dest="ModelHparams.model", type=_listable(str, False, "--models"),
                   default=argparse.SUPPRESS, metavar="MODELS",
                   help="comma-separated model names (same as --model)")
    g.add_argument("--workers", type=int, default=None,
                   help="local: experiments run at the same time (default: one per CPU core, each with 1 torch "
                        "thread, when the experiments run on the CPU: measured faster than fewer workers with "
                        "more threads, benchmarks/RESULTS.md; 1 on a GPU); ray: the cluster's resources decide")
    g.add_argument("--backend", choices=BACKENDS, default="local",
                   help="local: a pool of processes; ray: Ray tasks (pip install 'lottery[ray]'); "
                        "serial: one at a time in this process (default: local)")
    g.add_argument("--ray-address", default=None,
                   help="join this running Ray cluster: auto or HOST:6379 on a cluster node, ray://HOST:10001 "
                        "from outside (needs pip install 'ray[client]'); default: start a local Ray")
    g.add_argument("--threads-per-worker", type=int, default=None,
                   help="torch threads per experiment (default: --threads, else CPUs // workers)")
    g.add_argument("--num-cpus", type=float, default=None, help="ray: CPUs asked per experiment (default: threads per worker)")
    g.add_argument("--num-gpus", type=float, default=0,
                   help="ray: GPUs asked per experiment; > 0 runs the experiments on cuda (default: 0)")
    g.add_argument("--stack", type=_stack_size, default="auto",
                   help="train runs that differ only in their seed (dense runs, dense references, IMP replicates) or "
                        "in s0, lam and seed (CS ticket searches) and share one data order (--data-order-seed for "
                        "different seeds) as stacked networks of at most this many, each stack one job of a worker; 'auto': a size "
                        "from the device, the model's size and, on the CPU, the workers (every worker gets a "
                        "stack), said in the log, and no stacks where they do not pay (one run, no more runs "
                        "than workers, or a convolutional network on the CPU); 1: no stacking; unsupported models "
                        "and options run unstacked "
                        "after one line (default: auto)")
    g.add_argument("--name", default=None, help="sweep name: the record is <out>/sweep_<name>.json (default: a hash of the jobs)")
    g.add_argument("--no-report", action="store_true", help="skip the table and plots at the end")


def register(top_sub, common_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``sweep`` and ``report`` to the top-level sub-parsers ``top_sub``.

    ``sweep`` has ``cs`` (``--mode ticket|prune``), ``train``, and ``imp``, ``imp-c``, ``lrr``,
    ``finetune``, ``magnitude`` when :mod:`lottery.pipelines.imp` is there. ``common_flags`` is the
    CLI's ``common_flags`` (data, model, training flags and --out, --seed, --device ...).
    """
    from lottery.methods.cs import CSHparams
    from lottery.sweep import GROUP_CLASSES, _resolve, get_kind, kind_available

    sweep = top_sub.add_parser(
        "sweep", help="many experiments in parallel (local processes or Ray)",
        description="Run every combination of the listed hparam values and seeds, several at a time; "
                    "then print the table and write the plots of `lottery report`.",
    )
    sweep_sub = sweep.add_subparsers(dest="sweep_method", metavar="METHOD", parser_class=OneLineErrorParser)
    sweep_sub.required = True

    p = sweep_sub.add_parser(
        "cs", help="Continuous Sparsification ticket searches (or pruning: --mode prune)",
        description="A sweep of CS runs: any hparam flag may list values (commas; ';' for list-valued "
                    "hparams such as --milestones). Each seed's dense reference is trained once, first.",
    )
    common_flags(p)
    add_hparams_flags(p, CSHparams, "continuous sparsification")
    p.add_argument("--mode", choices=("ticket", "prune"), default="ticket",
                   help="ticket: retrain mask x rewind weights (search cs); prune: final weights x mask (prune cs)")
    p.add_argument("--no-dense", action="store_true", help="do not train the dense reference networks")
    p.add_argument("--strict", action="store_true",
                   help="a CS search round whose mask did not converge fails that experiment (default: a warning)")
    _sweep_flags(p)
    _make_listable(p)
    p.set_defaults(func=cmd_sweep, sweep_kind="cs")

    p = sweep_sub.add_parser("train", help="dense trainings",
                             description="A sweep of dense trainings: any hparam flag may list values.")
    common_flags(p)
    _sweep_flags(p)
    _make_listable(p)
    p.set_defaults(func=cmd_sweep, sweep_kind="train")

    for command, kind, title, help_text in _METHOD_COMMANDS:
        if not kind_available(kind):  # its pipeline is not there (yet): no command
            continue
        group = get_kind(kind).groups[-1]
        cls = _resolve(GROUP_CLASSES[group])
        p = sweep_sub.add_parser(command, help=help_text,
                                 description=f"A sweep of {title} runs: any hparam flag may list values.")
        common_flags(p)
        # The kind fixes some hparams itself (IMP-C: variant 'continue'): no flag for those.
        add_hparams_flags(p, cls, title, skip=tuple(k.split(".", 1)[1] for k, _ in get_kind(kind).forced))
        _sweep_flags(p)
        _make_listable(p)
        p.set_defaults(func=cmd_sweep, sweep_kind=kind)

    r = top_sub.add_parser(
        "report", help="table and plots of finished runs",
        description="Gather results.json of the given run folders (and of run folders below them), group "
                    "runs that differ only in their seed, and write a table (CSV, Markdown) and plots "
                    "(PNG, SVG): accuracy against density and against FLOPs, per-layer density and FLOPs share "
                    "of a ticket, epochs against number of tickets; print the sparsest ticket matching the "
                    "dense network per method.",
    )
    r.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders, or folders holding them")
    r.add_argument("--out", type=Path, default=Path("report"), help="folder for the table and plots (default: report)")
    r.add_argument("--layers", type=Path, default=None, metavar="RUN_DIR",
                   help="ticket whose per-layer density to draw (default: the sparsest matching ticket)")
    r.set_defaults(func=cmd_report)

    pr = top_sub.add_parser(
        "plot-run", help="curves of one run over training (accuracy, density, temperature)",
        description="Draw a run's metrics.csv against epochs: validation and test accuracy, density and the "
                    "CS temperature where recorded, one line per stage. With --tensorboard, also (re)write the "
                    "run's TensorBoard events from metrics.csv.",
    )
    pr.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (one that holds metrics.csv)")
    pr.add_argument("--out", type=Path, default=None, help="the PNG to write (default: RUN_DIR/run_curves.png)")
    pr.add_argument("--tensorboard", action="store_true", help="also write RUN_DIR/tensorboard (needs lottery[tensorboard])")
    pr.set_defaults(func=cmd_plot_run)


# -- from flags to job specs ---------------------------------------------------------------------------
def _split_alternatives(args: argparse.Namespace) -> tuple[argparse.Namespace, dict[str, list[Any]]]:
    """A namespace with the first value of every listed flag, and the grid of the flags given several."""
    single = argparse.Namespace(**vars(args))
    grid: dict[str, list[Any]] = {}
    for key, value in vars(args).items():
        if isinstance(value, Alternatives):
            setattr(single, key, value[0])
            if len(value) > 1:
                cls_name, fname = key.split(".", 1)
                grid[f"{_group_of_class(cls_name)}.{fname}"] = list(value)
    return single, grid


def sweep_specs(args: argparse.Namespace):
    """The job specs of a parsed ``lottery sweep ...`` command line."""
    from lottery.cli.cs import cs_job
    from lottery.sweep import GROUP_CLASSES, _resolve, expand_grid, get_kind, make_spec, spec_from_job

    single, grid = _split_alternatives(args)
    seeds = args.seeds if args.seeds is not None else [args.seed]
    kind = args.sweep_kind
    if kind == "cs":
        base = spec_from_job(cs_job(single, args.mode))
    else:
        preset, data, model, training = base_groups(single)
        groups = {"data": data, "model": model, "training": training}
        method_group = get_kind(kind).groups[-1]
        if method_group not in groups:
            cls = _resolve(GROUP_CLASSES[method_group])
            groups[method_group] = hparams_from_args(single, cls, cls.from_dict(preset.methods.get(method_group, {})))
        base = make_spec(kind, **groups)
    specs = expand_grid(base, grid, seeds)
    for s in specs:
        validate_names(s.group("data"), s.group("model"))
    return specs


def default_workers(device: str, backend: str) -> int:
    """Local sweeps on the CPU: one worker per usable core (each then gets 1 torch thread). On 2 cores, 2
    workers x 1 thread ran 1.24x more experiments per hour than 1 worker x 2 threads (benchmarks/speed.py,
    part workers): small networks do not keep two threads busy, two processes do. On a GPU the local
    workers would share one device, so 1."""
    from lottery.experiment import resolve_device
    from lottery.sweep import default_threads_per_worker

    if backend != "local" or resolve_device(device).startswith("cuda"):
        return 1

    return default_threads_per_worker(1)  # the usable CPUs


def cmd_sweep(args: argparse.Namespace) -> int:
    from lottery.report import print_table, write_report
    from lottery.sweep import run_sweep

    if args.workers is None:
        args.workers = default_workers(args.device, args.backend)
    if args.workers < 1:
        raise ConfigError(f"--workers must be a positive integer, got {args.workers}")
    specs = sweep_specs(args)
    if args.backend == "ray" and args.num_gpus > 0:
        args.device = "cpu"  # the tasks run on the GPUs Ray gives them; this process may have none
    options = run_options(args)
    options.strict = bool(getattr(args, "strict", False))
    result = run_sweep(
        specs, options, workers=args.workers, backend=args.backend,
        threads_per_worker=args.threads_per_worker or args.threads, name=args.name,
        ray_address=args.ray_address, num_cpus=args.num_cpus, num_gpus=args.num_gpus, stack=args.stack,
    )
    ok_dirs = [o.run_dir for o in result.outcomes if o.ok and o.run_dir]
    if ok_dirs and not args.no_report:
        folder = Path(args.out) / f"report_{result.name}"
        report = write_report(ok_dirs, folder)
        print(f"\nsweep {result.name}: {len(ok_dirs)} runs, grouped over seeds")
        print(report.text())
        print(f"table and plots: {folder}")
    else:
        print_table([o.results for o in result.outcomes if o.ok], title=f"sweep {result.name}: {len(ok_dirs)} runs")
    print(f"sweep record: {result.path} ({result.wall_seconds:.1f} s, {result.total_epochs:g} epochs)")
    if result.failures:
        # Each failure was logged with its job and error as it happened, and is in the record.
        print(f"lottery: {len(result.failures)} of {len(result.outcomes)} experiments failed; "
              f"their errors are listed above and in {result.path}", file=sys.stderr)
        return 1
    return 0


def cmd_plot_run(args: argparse.Namespace) -> int:
    from lottery.tracking import plot_run, read_metrics, require_tensorboard, write_tensorboard

    if args.tensorboard:
        require_tensorboard()
    files = plot_run(args.run_dir, args.out)
    if args.tensorboard:
        files.append(write_tensorboard(args.run_dir, read_metrics(args.run_dir)))
    print("written: " + ", ".join(str(f) for f in files))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lottery.report import write_report

    report = write_report(args.run_dirs, args.out, layers=args.layers)
    print(report.text())
    print(f"\nfiles in {args.out}: {', '.join(sorted(p.name for p in report.files))}")
    return 0
