"""Tickets of your own network: register it, search CS tickets at several densities beside IMP with rewinding,
then one table and one plot of accuracy against density. The tutorial (docs/tutorial.md) walks through it.

    python examples/own_model_tickets.py                   # Fashion-MNIST, ~15 min on 2 cores
    python examples/own_model_tickets.py --quick           # tiny synthetic data, seconds (a smoke test)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from lottery.models import register_model


# 1. Your network: any nn.Module. Registering it (at the top level of the script, so that the sweep's
#    worker processes register it too) gives it a name the run folders, sweeps and reports can use.
#    prune_ignore: weights never pruned (here the output layer, as for LeNet in the papers).
@register_model("my_mlp", input_shape=(1, 28, 28), prune_ignore=("head.weight",))
class MyMLP(nn.Module):
    """A two-layer MLP of our own: 784-200-200-classes."""

    def __init__(self, input_shape, num_classes, hidden: int = 200):
        super().__init__()
        c, h, w = input_shape
        self.fc1 = nn.Linear(c * h * w, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(self.fc2(self.fc1(x).relu()).relu())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/own_model")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny synthetic data and a few steps")
    args = ap.parse_args()

    from lottery.experiment import RunOptions
    from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
    from lottery.methods.cs import CSHparams
    from lottery.methods.imp import IMPHparams
    from lottery.report import write_report
    from lottery.sweep import expand_grid, make_spec, run_sweep

    # 2. The recipe: data, model, training; the same for every method so that they compare.
    if args.quick:
        data = DataHparams(dataset="synthetic", synthetic_shape=(1, 28, 28), synthetic_train_size=128,
                           synthetic_test_size=64, val_size=32)
        training = TrainingHparams(training_steps="3ep", batch_size=32, lr=0.05)
        cs, imp, seeds = CSHparams(rounds=2, rewind="1ep"), IMPHparams(levels=2, rewind="1ep"), [0]
        densities = [0.5, 0.2]
    else:
        data = DataHparams(dataset="fashion-mnist")
        training = TrainingHparams(training_steps="10ep", batch_size=128, lr=0.1)
        cs, imp, seeds = CSHparams(rounds=2, rewind="1ep"), IMPHparams(levels=5, rewind="1ep"), [0, 1]
        densities = [0.2, 0.1, 0.05]
    model = ModelHparams(model="my_mlp")

    # 3. The experiments: CS at several target densities (tickets found in parallel) and IMP with rewinding
    #    (one ticket per level, found one after the other). Each is a resumable run folder under --out.
    base = make_spec("cs", data=data, model=model, training=training, cs=cs)
    specs = expand_grid(base, {"density": densities}, seeds=seeds)
    specs += expand_grid(make_spec("imp", data=data, model=model, training=training, imp=imp), seeds=seeds)
    result = run_sweep(specs, RunOptions(out=args.out), workers=args.workers)
    if result.failures:
        raise SystemExit(f"{len(result.failures)} experiment(s) failed; see the messages above")

    # 4. One table (mean +- std over seeds, matching the dense network or not) and the plots.
    report = write_report([args.out], Path(args.out) / "report")
    print(report.text())
    print("\nfiles:", *map(str, report.files), sep="\n  ")


if __name__ == "__main__":
    main()
