"""`lottery search cs` and `lottery prune cs`: Continuous Sparsification; also creates the `search`
and `prune` command groups that the other method families add to."""

from __future__ import annotations

import argparse

from lottery.cli.common import (
    OneLineErrorParser, add_hparams_flags, base_groups, common_flags, hparams_from_args, is_main_rank,
    read_dense_costs, run_options, training_length_given, validate_names,
)


def cs_job(args: argparse.Namespace, mode: str):
    from lottery.methods.cs import CSHparams
    from lottery.pipelines.cs import CSJob

    preset, data, model, training = base_groups(args)
    model = preset.model_for("cs", model, given={k.split(".", 1)[1] for k in vars(args) if k.startswith("ModelHparams.")})
    validate_names(data, model)
    cs = hparams_from_args(args, CSHparams, CSHparams.from_dict(preset.methods.get("cs", {})))
    if (training_length_given(args) and "CSHparams.round_steps" not in vars(args)
            and cs.round_steps is not None and training.training_steps != preset.training.training_steps):
        # A new training length (--epochs N, --training-steps S) sets the length of everything: a round is
        # then as long as the training, whatever round length the preset has. The preset's own length,
        # given explicitly, changes nothing (the same run folder as without the flag). Milestones of the
        # preset's round go with it, unless given on the command line. The run's plan line says where
        # the round length came from (after the settings are checked: bad input stays a one-line error).
        changes = {"round_steps": None}
        if cs.round_milestones and "CSHparams.round_milestones" not in vars(args):
            changes["round_milestones"] = None
        cs = cs.replace(**changes)
    return CSJob(data, model, training, cs, seed=args.seed, mode=mode, dense_reference=not args.no_dense)


def cmd_search_cs(args: argparse.Namespace, mode: str = "ticket") -> int:
    from lottery.pipelines.cs import run_cs
    from lottery.report import plot_run_summary, print_table

    job = cs_job(args, mode)
    options = run_options(args)
    options.strict = bool(getattr(args, "strict", False))
    results = run_cs(job, options)
    if not is_main_rank():
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


def register(sub):
    """Add `search` and `prune` with their `cs` commands; returns the two subparsers, which the other
    method families add their commands to."""
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
        common_flags(p)
        add_hparams_flags(p, CSHparams, "continuous sparsification")
        p.add_argument("--no-dense", action="store_true", help="do not train the dense reference network")
        p.add_argument("--strict", action="store_true",
                       help="stop with an error when a search round's mask did not converge (default: a warning)")
        p.set_defaults(func=lambda a, m=mode: cmd_search_cs(a, m))
    return search_sub, prune_sub
