"""Commands of the stochastic-L0 and gradual-magnitude-pruning baselines: ``search l0``, ``prune l0`` and
``prune gmp``.

:func:`register` adds them to the ``lottery search`` / ``lottery prune`` sub-parsers that
:mod:`lottery.cli` builds. Flags come from the hparams dataclasses (``add_hparams_flags``); values come
from, in increasing priority: the dataclass defaults, the preset's ``methods["l0"]`` / ``methods["gmp"]``
overrides, and the flags given.
"""

from __future__ import annotations

import argparse
from typing import Callable
from lottery.cli.common import (
    add_hparams_flags, base_groups, hparams_from_args, is_main_rank, read_dense_costs, run_options, validate_names,
)


def register(search_sub, prune_sub, common_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``search l0``, ``prune l0`` and ``prune gmp``.

    ``search_sub`` / ``prune_sub``: the sub-parsers (``add_subparsers()`` results) of ``lottery search``
    and ``lottery prune``; ``common_flags(parser)`` adds the flags every training command has (preset,
    out, seed, data/model/training hparams, ...).
    """
    from lottery.methods.gmp import GMPHparams
    from lottery.methods.l0 import L0Hparams

    for parent, mode in ((search_sub, "ticket"), (prune_sub, "prune")):
        p = parent.add_parser(
            "l0", help="stochastic L0 regularisation (hard concrete gates, Louizos et al. 2018)",
            description="Stochastic L0 regularisation (Louizos, Welling & Kingma 2018): one hard concrete gate "
                        "per prunable weight, trained with the expected-L0 penalty; the mask is z > 0 of the "
                        "test-time gate; "
                        + ("the mask applied to the rewind-point weights is retrained as a ticket."
                           if mode == "ticket" else "the final weights times their gates, optionally fine-tuned."),
        )
        common_flags(p)
        add_hparams_flags(p, L0Hparams, "stochastic L0 (hard concrete)")
        p.add_argument("--no-dense", action="store_true", help="do not train the dense reference network")
        p.set_defaults(func=lambda a, m=mode: cmd_l0(a, m))

    p = prune_sub.add_parser(
        "gmp", help="gradual magnitude pruning during training (Zhu & Gupta 2017)",
        description="Gradual magnitude pruning (Zhu & Gupta 2017): one training run in which the density "
                    "falls from 1 to --density along a cubic schedule, pruning by magnitude every "
                    "--prune-every steps between --prune-start and --prune-end, then training on at the "
                    "final density.",
    )
    common_flags(p)
    add_hparams_flags(p, GMPHparams, "gradual magnitude pruning")
    p.add_argument("--no-dense", action="store_true", help="do not train the dense reference network")
    p.set_defaults(func=cmd_gmp)


def _l0_job(args: argparse.Namespace, mode: str):
    from lottery.methods.l0 import L0Hparams
    from lottery.pipelines.l0 import L0Job

    preset, data, model, training = base_groups(args)
    validate_names(data, model)
    hp = hparams_from_args(args, L0Hparams, L0Hparams.from_dict(preset.methods.get("l0", {})))
    if args.epochs is not None and "L0Hparams.search_steps" not in vars(args):
        # --epochs N sets the length of everything: the search is then as long as the training.
        hp = hp.replace(search_steps=None)
    return L0Job(data, model, training, hp, seed=args.seed, mode=mode, dense_reference=not args.no_dense)


def _gmp_job(args: argparse.Namespace):
    from lottery.methods.gmp import GMPHparams
    from lottery.pipelines.gmp import GMPJob

    preset, data, model, training = base_groups(args)
    validate_names(data, model)
    hp = hparams_from_args(args, GMPHparams, GMPHparams.from_dict(preset.methods.get("gmp", {})))
    return GMPJob(data, model, training, hp, seed=args.seed, dense_reference=not args.no_dense)


def _print(results: dict, options, title: str) -> None:
    from lottery.report import plot_run_summary, print_table

    rows = []
    if results.get("dense_test_accuracy") is not None:
        rows.append({"method": "dense", "model": results["model"], "dataset": results["dataset"],
                     "seed": results["seed"], "density": 1.0, "test_accuracy": results["dense_test_accuracy"],
                     **read_dense_costs(results)})
    rows.append(results)
    print_table(rows, title=title)
    plot = plot_run_summary(options.out, results)
    print(f"run folder: {results['run_dir']}")
    print(f"plot: {plot}")


def cmd_l0(args: argparse.Namespace, mode: str = "ticket") -> int:
    from lottery.pipelines.l0 import run_l0

    job = _l0_job(args, mode)
    options = run_options(args)
    results = run_l0(job, options)
    if not is_main_rank():
        return 0
    what = "ticket search" if mode == "ticket" else "pruning"
    _print(results, options, f"stochastic L0 {what} (lam {job.l0.lam:g}): dense vs "
                             f"{'ticket' if mode == 'ticket' else 'pruned network'}")
    return 0


def cmd_gmp(args: argparse.Namespace) -> int:
    from lottery.pipelines.gmp import run_gmp

    job = _gmp_job(args)
    options = run_options(args)
    results = run_gmp(job, options)
    if not is_main_rank():
        return 0
    _print(results, options, f"gradual magnitude pruning ({job.gmp.scope}) to density {job.gmp.density:g}: "
                             "dense vs pruned network")
    return 0
