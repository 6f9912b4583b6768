"""Commands of the IMP family: ``search imp``, ``search imp-c``, ``prune magnitude|lrr|finetune``,
``control random-prune|random-reinit`` and ``stability``.

:func:`register` adds them to the parsers that :mod:`lottery.cli` builds. Flags come from the hparams
dataclasses (``add_hparams_flags``), so a new field is on the command line without touching this file.
Values come from, in increasing priority: the dataclass defaults, the preset's ``methods[<name>]``
overrides, and the flags given.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable
from lottery.cli.common import add_hparams_flags, base_groups, hparams_from_args, run_option_flags, run_options, validate_names


def register(search_sub, prune_sub, top_sub, common_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the IMP-family commands.

    ``search_sub`` / ``prune_sub``: the sub-parsers (``add_subparsers()`` results) of ``lottery search`` and
    ``lottery prune``; ``top_sub``: the top-level sub-parsers of ``lottery``; ``common_flags(parser)``: adds
    the flags every training command has (preset, out, seed, data/model/training hparams, ...).
    """
    from lottery.methods.imp import (
        FinetuneHparams, IMPHparams, LRRHparams, OneShotHparams, RandomPruneHparams, RandomReinitHparams,
    )
    from lottery.methods.stability import StabilityHparams

    for name, variant, short, text in (
        ("imp", "rewind", "iterative magnitude pruning (LTH; IMP-R with --rewind > 0)", "Iterative magnitude pruning (Frankle & Carbin 2019; with --rewind > 0: IMP-R, "
                          "Frankle et al. 2020). Level L prunes the smallest weights of level L-1's trained "
                          "network and retrains the mask from the rewind point k."),
        ("imp-c", "continue", "IMP-C: IMP without rewinding between levels", "IMP-C: iterative magnitude pruning without rewinding between levels (the "
                              "counterpart of CS): each level's pruned weights keep training with the LR schedule "
                              "restarted; every level's mask is also retrained from the rewind point as a ticket."),
    ):
        p = search_sub.add_parser(name, help=short, description=text)
        common_flags(p)
        add_hparams_flags(p, IMPHparams, "iterative magnitude pruning", skip=("variant",))
        p.set_defaults(func=lambda a, v=variant: cmd_search_imp(a, v))

    p = prune_sub.add_parser("magnitude", help="one-shot magnitude pruning of the trained dense network",
                             description="Prune the trained dense network (trained or reused, as `lottery "
                                         "train`) to --density by weight magnitude in one step; optionally "
                                         "fine-tune at the final learning rate.")
    common_flags(p)
    add_hparams_flags(p, OneShotHparams, "one-shot magnitude pruning")
    p.set_defaults(func=cmd_prune_magnitude)

    p = prune_sub.add_parser("lrr", help="iterative pruning with learning-rate rewinding",
                             description="Learning-rate rewinding (Renda et al. 2020): per level, prune by "
                                         "magnitude, keep the final weights and replay the LR schedule from --rewind.")
    common_flags(p)
    add_hparams_flags(p, LRRHparams, "learning-rate rewinding")
    p.set_defaults(func=cmd_prune_lrr)

    p = prune_sub.add_parser("finetune", help="iterative pruning with fine-tuning",
                             description="Per level, prune by magnitude, keep the final weights and train at "
                                         "the recipe's final (small) learning rate.")
    common_flags(p)
    add_hparams_flags(p, FinetuneHparams, "fine-tuning")
    p.set_defaults(func=cmd_prune_finetune)

    control = top_sub.add_parser("control", help="random controls of an IMP level (random-prune, random-reinit)",
                                 description="Baselines against a saved level of an IMP run: its own run folder "
                                             "with results.json.")
    control_sub = control.add_subparsers(dest="control", metavar="CONTROL")
    control_sub.required = True
    for name, cls, short, text in (
        ("random-prune", RandomPruneHparams, "a random mask with the level's per-layer (or total) counts",
         "A random mask with the level's kept count per layer (layerwise) or in total (global), retrained "
         "from the run's rewind state."),
        ("random-reinit", RandomReinitHparams, "the level's mask on newly drawn random weights",
         "The level's mask on newly drawn random weights, trained like the ticket (from k to the end)."),
    ):
        p = control_sub.add_parser(name, help=short, description=text)
        p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="folder of an IMP run (search imp / imp-c)")
        add_hparams_flags(p, cls, name)
        run_option_flags(p)
        p.set_defaults(func=lambda a, n=name, c=cls: cmd_control(a, n, c))

    p = top_sub.add_parser("stability", help="instability and distance against the rewind point k",
                           description="For each rewind point k, train two copies (dense, or with --mask) "
                                       "from the state at k with different data orders; report the test-error "
                                       "barrier on the line between them (instability) and their L2 distance "
                                       "to the trained dense network, as a table and a plot.")
    common_flags(p)
    add_hparams_flags(p, StabilityHparams, "stability")
    p.set_defaults(func=cmd_stability)


def _method_hparams(args, preset, cls, key: str, **fixed):
    base = cls.from_dict({**preset.methods.get(key, {}), **fixed})
    return hparams_from_args(args, cls, base)


def _print_levels(results: dict, title: str) -> None:
    """The per-level table was logged by the pipeline; add the headline and where the files are."""
    print(f"\n{title}")
    best = results.get("sparsest_matching")
    levels = results.get("levels") or []
    dense = levels[0].get("test_accuracy") if levels and levels[0].get("level") == 0 else None
    against = f" against dense {100 * dense:.2f}%" if dense is not None else ""
    if best:
        print(f"sparsest matching level: {best['level']} (density {best['density']:.4f}, "
              f"test {100 * best['test_accuracy']:.2f}%{against}; one seed; matching: at most 0.2 points below dense)")
    elif dense is None:
        print("no matching level: the dense network's accuracy (level 0) is not known")
    else:
        print(f"no level matches: every one is more than 0.2 points below the dense network ({100 * dense:.2f}%)")
    print(f"run folder: {results['run_dir']}")
    print(f"plot: {Path(results['run_dir']) / 'accuracy_vs_density.png'}")


def cmd_search_imp(args: argparse.Namespace, variant: str) -> int:
    from lottery.methods.imp import IMPHparams
    from lottery.pipelines.imp import IMPJob, run_imp

    preset, data, model, training = base_groups(args)
    validate_names(data, model)
    imp = _method_hparams(args, preset, IMPHparams, "imp", variant=variant)
    results = run_imp(IMPJob(data, model, training, imp, seed=args.seed), run_options(args))
    _print_levels(results, f"{'IMP' if variant == 'rewind' else 'IMP-C'} (rewind {imp.rewind}): tickets per level")
    return 0


def cmd_prune_lrr(args: argparse.Namespace) -> int:
    from lottery.methods.imp import LRRHparams
    from lottery.pipelines.imp import LRRJob, run_lrr

    preset, data, model, training = base_groups(args)
    validate_names(data, model)
    hp = _method_hparams(args, preset, LRRHparams, "lrr")
    results = run_lrr(LRRJob(data, model, training, hp, seed=args.seed), run_options(args))
    _print_levels(results, "learning-rate rewinding: pruned network per level")
    return 0


def cmd_prune_finetune(args: argparse.Namespace) -> int:
    from lottery.methods.imp import FinetuneHparams
    from lottery.pipelines.imp import FinetuneJob, run_finetune

    preset, data, model, training = base_groups(args)
    validate_names(data, model)
    hp = _method_hparams(args, preset, FinetuneHparams, "finetune")
    results = run_finetune(FinetuneJob(data, model, training, hp, seed=args.seed), run_options(args))
    _print_levels(results, "fine-tuning: pruned network per level")
    return 0


def cmd_prune_magnitude(args: argparse.Namespace) -> int:
    from lottery.methods.imp import OneShotHparams
    from lottery.pipelines.oneshot import OneShotJob, run_one_shot
    from lottery.report import plot_run_summary, print_table

    preset, data, model, training = base_groups(args)
    validate_names(data, model)
    hp = _method_hparams(args, preset, OneShotHparams, "magnitude")
    options = run_options(args)
    results = run_one_shot(OneShotJob(data, model, training, hp, seed=args.seed), options)
    dense = {"method": "dense", "model": results["model"], "dataset": results["dataset"], "seed": results["seed"],
             "density": 1.0, "test_accuracy": results["dense_test_accuracy"]}
    print_table([dense, results], title=f"one-shot magnitude pruning ({hp.scope}): dense vs pruned")
    print(f"run folder: {results['run_dir']}")
    print(f"plot: {plot_run_summary(options.out, results)}")
    return 0


def cmd_control(args: argparse.Namespace, name: str, cls) -> int:
    from lottery.errors import ConfigError
    from lottery.pipelines.controls import run_random_prune, run_random_reinit
    from lottery.report import print_table

    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a folder (expected an IMP run folder)")
    if args.out is None:
        args.out = run_dir.resolve().parent
    hp = hparams_from_args(args, cls)
    options = run_options(args)
    run = run_random_prune if name == "random-prune" else run_random_reinit
    results = run(run_dir, hp, options)
    ticket = {**results, "method": "ticket (IMP)", "test_accuracy": results.get("ticket_test_accuracy"),
              "epochs": None, "wall_seconds": None}
    print_table([ticket, results], title=f"{name} control of level {hp.level}")
    print(f"run folder: {results['run_dir']}")
    return 0


def cmd_stability(args: argparse.Namespace) -> int:
    from lottery.methods.stability import StabilityHparams
    from lottery.pipelines.stability import StabilityJob, run_stability

    preset, data, model, training = base_groups(args)
    validate_names(data, model)
    hp = _method_hparams(args, preset, StabilityHparams, "stability")
    results = run_stability(StabilityJob(data, model, training, hp, seed=args.seed), run_options(args))
    unstable = [r["rewind"] for r in results["rows"] if r["instability"] >= results["stable_below"]]
    print(f"\nstable (instability < {100 * results['stable_below']:g}%) at every k" if not unstable
          else f"\nunstable at k = {', '.join(unstable)}")
    folder = Path(results["run_dir"])
    print(f"run folder: {folder}")
    print(f"table: {folder / 'stability.md'}, {folder / 'stability.csv'}")
    print(f"plot: {folder / 'stability.png'}")
    return 0
