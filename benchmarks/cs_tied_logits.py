"""Do tied mask logits end a CS round undecided when ``--density`` cuts through them? (docs/cs.md)

Weights that get identical gradients (those of dead units, or of inputs that are always 0) have tied
logits, and a common shift of the logits cannot separate them. This benchmark builds that case on
purpose: a small MLP on a synthetic task whose inputs 10 to 19 are always 0, so 42 % of all masked
weights (the first layer's columns 10 to 19) only ever see the penalty's gradient. It runs the Python
API's loop (``ContinuousSparsification``, default recipe, ``density=...``) and reports the fraction of
logits undecided (``|beta_final * s| < ln 99``) at the end, for three variants of the projection:

* ``before``: the projection as first written (a split tie left at 0 / just above);
* ``gap`` (lottery's default): split ties set ``2 ln 99 / beta_final`` apart, the cut kept centred;
* ``gap, lam 0``: the same without the L0 penalty (not the default: see docs/cs.md).

    python benchmarks/cs_tied_logits.py            # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from lottery.methods import cs as cs_module  # noqa: E402
from lottery.methods.cs import ContinuousSparsification  # noqa: E402
from lottery.methods.cs_convergence import undecided_fractions  # noqa: E402

VARIANTS = {"before": (False, 1e-8), "gap": (True, 1e-8), "gap, lam 0": (True, 0.0)}


def task(seed: int, n: int = 512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = (x[:, :5] @ torch.randn(5, 4, generator=g)).argmax(1)
    x[:, 10:] = 0  # dead inputs: their weights' logits are tied
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]


def undecided_after_search(variant: str, density: float, seed: int, epochs_per_round: int, rounds: int) -> float:
    with_gap, lam = VARIANTS[variant]
    original = cs_module.tie_gap
    cs_module.tie_gap = original if with_gap else (lambda beta_final: 0.0)
    try:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
        batches = task(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        cs = ContinuousSparsification(model, opt, epochs_per_round=epochs_per_round, steps_per_epoch=len(batches),
                                      rounds=rounds, density=density, lam=lam)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the undecided fraction is what is measured
            for _ in range(cs.total_epochs):
                for x, y in batches:
                    loss = F.cross_entropy(model(x), y) + cs.penalty()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    cs.step()
                cs.epoch_end()
        return undecided_fractions(model, cs.hp.beta_final)["overall"]
    finally:
        cs_module.tie_gap = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--densities", default="0.1,0.4,0.7,0.9")
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    densities = [float(d) for d in args.densities.split(",")]
    # (epochs per round, rounds): rounds of 32 and of 128 steps, two rounds; one round of 128 and 256 steps
    settings = [(2, 2), (8, 2), (8, 1), (16, 1)]
    print(f"machine: {machine()}")
    print(f"| variant | density | runs | undecided % at the end: median | max | runs above 1 % |")
    print("|---|---|---|---|---|---|")
    for variant in VARIANTS:
        for d in densities:
            values = [100 * undecided_after_search(variant, d, seed, e, r)
                      for seed in range(args.seeds) for e, r in settings]
            print(f"| {variant} | {d:g} | {len(values)} | {statistics.median(values):.1f} | {max(values):.1f} | "
                  f"{sum(v > 1 for v in values)} |", flush=True)


if __name__ == "__main__":
    main()
