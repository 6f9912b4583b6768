"""Pruning (not tickets) on LeNet-300-100 / Fashion-MNIST, 3 seeds: CS pruning against one-shot and
iterative magnitude pruning with fine-tuning, accuracy against density.

* CS pruning (``lottery prune cs``): the searched network with its masks hardened, no fine-tuning. The
  search is the one of the CS ticket benchmark (benchmarks/cs_lenet_fashion.py, same hparams and seed):
  run in the same --out folder, the pruning run copies its finished rounds instead of searching again.
  Its cost is the search: 3 rounds of 20 epochs = 60 epochs.
* One-shot magnitude pruning (``lottery prune magnitude``): the trained dense network (40 epochs, shared
  with the other benchmarks) pruned globally by magnitude to each CS density, then fine-tuned
  ``--oneshot-finetune`` (default 20 epochs) at the recipe's final learning rate: 60 epochs in all, the
  same as CS's search.
* Iterative magnitude pruning with fine-tuning (``lottery prune finetune``): 20 % of the remaining weights
  per level (global), each level fine-tuned ``--iterative-finetune`` (default 5 epochs), down to the
  sparsest CS density; every level is a pruned network on the curve.

    python benchmarks/pruning_lenet_fashion.py --seeds 0,1,2 --workers 2
    python benchmarks/pruning_lenet_fashion.py --report-only
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, mean_std, read_results, run_parallel  # noqa: E402

PRESET = "fashion_lenet"


def _read(root: Path, pattern: str) -> list[dict]:
    return [r for _, r in read_results(root, pattern)]


def cs_settings(out: Path, seeds: list[int]) -> list[float]:
    """The s0 values of the CS ticket benchmark finished for every seed (their searches are reused)."""
    runs = [r for r in _read(out, "search-cs_*/results.json") if r.get("seed") in seeds]
    return sorted({r["s0"] for r in runs if sorted(x["seed"] for x in runs if x["s0"] == r["s0"]) == sorted(seeds)},
                  reverse=True)


def cs_prune_job(s0: float, seed: int, out: str):
    from lottery.experiment import RunOptions
    from lottery.methods.cs import CSHparams
    from lottery.pipelines.cs import CSJob, run_cs
    from lottery.presets import get_preset

    p = get_preset(PRESET)
    hp = CSHparams.from_dict(p.methods["cs"]).replace(s0=s0)  # as the ticket benchmark: its search is reused
    return run_cs(CSJob(p.data, p.model, p.training, hp, seed=seed, mode="prune"), RunOptions(out=out, progress=False))


def oneshot_job(density: float, finetune: str, seed: int, out: str):
    from lottery.experiment import RunOptions
    from lottery.methods.imp import OneShotHparams
    from lottery.pipelines.imp import OneShotJob, run_one_shot
    from lottery.presets import get_preset

    p = get_preset(PRESET)
    hp = OneShotHparams(density=density, finetune_steps=finetune)
    return run_one_shot(OneShotJob(p.data, p.model, p.training, hp, seed=seed), RunOptions(out=out, progress=False))


def iterative_job(levels: int, finetune: str, seed: int, out: str):
    from lottery.experiment import RunOptions
    from lottery.methods.imp import FinetuneHparams
    from lottery.pipelines.imp import FinetuneJob, run_finetune
    from lottery.presets import get_preset

    p = get_preset(PRESET)
    hp = FinetuneHparams(levels=levels, rate=0.2, finetune_steps=finetune)
    return run_finetune(FinetuneJob(p.data, p.model, p.training, hp, seed=seed), RunOptions(out=out, progress=False))


def _call(fn, job_args):
    return fn(*job_args)


def report(out: Path, seeds: list[int], oneshot_ft: str, iterative_ft: str) -> None:
    print(f"machine: {machine()}\n")
    print(f"recipe: {PRESET} preset; seeds {','.join(map(str, seeds))}; mean ± sample std over seeds\n")
    rows = []

    def add(method: str, runs: list[dict]) -> None:
        runs = [r for r in runs if r.get("seed") in seeds]
        if len(runs) < 2:
            return
        d, _ = mean_std([r["density"] for r in runs])
        a, asd = mean_std([r["test_accuracy"] for r in runs])
        e, _ = mean_std([r["epochs"] for r in runs])
        rows.append((method, d, a, asd, e, len(runs)))

    dense = [r for r in _read(out, "train_*/results.json") if r.get("seed") in seeds]
    add("dense", [{**r, "density": 1.0} for r in dense])
    cs = _read(out, "prune-cs_*/results.json")
    for s0 in sorted({r["s0"] for r in cs}, reverse=True):
        add(f"CS pruning s0={s0:g}", [r for r in cs if r["s0"] == s0])
    one = [r for r in _read(out, "prune-magnitude_*/results.json") if r.get("finetune_epochs") is not None]
    for d in sorted({r["target_density"] if "target_density" in r else round(r["density"], 4) for r in one}, reverse=True):
        add(f"one-shot magnitude + {oneshot_ft} FT", [r for r in one if (r.get("target_density") or round(r["density"], 4)) == d])
    it = _read(out, "prune-finetune_*/results.json")
    levels = sorted({lv["level"] for r in it for lv in r.get("levels", [])})
    for level in levels:
        lvs = [{**lv, "seed": r["seed"]} for r in it for lv in r.get("levels", []) if lv["level"] == level]
        if level > 0:
            add(f"iterative magnitude + {iterative_ft} FT, level {level}", lvs)
    print("| method | density | test accuracy % | epochs | seeds |")
    print("|---|---|---|---|---|")
    for method, d, a, asd, e, n in rows:
        print(f"| {method} | {d:.4f} | {100 * a:.2f} ± {100 * asd:.2f} | {e:.0f} | {n} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/out/cs_lenet_fashion",
                    help="the CS benchmark's folder: its dense runs and CS searches are reused")
    ap.add_argument("--oneshot-finetune", default="20ep")
    ap.add_argument("--iterative-finetune", default="5ep")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not args.report_only:
        s0s = cs_settings(out, seeds)
        if not s0s:
            sys.exit(f"no finished CS ticket runs for seeds {seeds} in {out}: run benchmarks/cs_lenet_fashion.py first")
        cs = run_parallel(_call, [(cs_prune_job, (s0, seed, str(out))) for s0 in s0s for seed in seeds], args.workers)
        densities = {}
        for r in cs:
            densities.setdefault(r["s0"], []).append(r["density"])
        targets = sorted({round(statistics.mean(v), 4) for v in densities.values()}, reverse=True)
        levels = math.ceil(math.log(min(targets)) / math.log(0.8))
        jobs = [(iterative_job, (levels, args.iterative_finetune, seed, str(out))) for seed in seeds]
        jobs += [(oneshot_job, (d, args.oneshot_finetune, seed, str(out))) for d in targets for seed in seeds]
        run_parallel(_call, jobs, args.workers)
    report(out, seeds, args.oneshot_finetune, args.iterative_finetune)


if __name__ == "__main__":
    main()
