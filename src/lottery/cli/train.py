"""`lottery train`: a dense network."""

from __future__ import annotations

import argparse

from lottery.cli.common import base_groups, common_flags, is_main_rank, run_options, validate_names


def cmd_train(args: argparse.Namespace) -> int:
    from lottery.experiment import DenseJob, train_dense
    from lottery.report import print_table

    _, data, model, training = base_groups(args)
    validate_names(data, model)
    options = run_options(args)
    results = train_dense(DenseJob(data, model, training, seed=args.seed), options)
    if not is_main_rank():
        return 0
    print_table([results], title="dense training")
    print(f"run folder: {results['run_dir']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a dense network", description="Train a dense network.")
    common_flags(p)
    p.set_defaults(func=cmd_train)
