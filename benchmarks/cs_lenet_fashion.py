"""Dense network and CS tickets on Fashion-MNIST, several s0 values, several seeds: LeNet-300-100 by
default, any preset's recipe with --preset (e.g. fashion_conv4_narrow, the CPU convolutional network).

Every run is a normal lottery run folder under --out, so a killed benchmark resumes and a finished
one is reused. Prints Markdown tables (mean and sample std over seeds) for benchmarks/RESULTS.md.

    python benchmarks/cs_lenet_fashion.py --s0 0.05,0,-0.05,-0.1 --seeds 0,1,2 --workers 2
    python benchmarks/cs_lenet_fashion.py --preset fashion_conv4_narrow --out benchmarks/out/cs_conv_fashion
    python benchmarks/cs_lenet_fashion.py --density 0.1678,0.1074 --out benchmarks/out/cs_density_lenet

With --density the searches ask for those densities (CS's default recipe picks the initial logit; --s0 and
--lam are then not used) and the table says whether every search round's mask became binary. The runs
are those of `lottery sweep cs --preset P --density ... --seeds ... --out ...` (same run folders).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, mean_std, run_parallel  # noqa: E402


def dense_job(seed: int, out: str, preset: str = "fashion_lenet"):
    from lottery.experiment import DenseJob, RunOptions, train_dense
    from lottery.presets import get_preset

    p = get_preset(preset)
    return train_dense(DenseJob(p.data, p.model, p.training, seed=seed), RunOptions(out=out, progress=False))


def cs_job(s0: float | None, lam: float | None, seed: int, out: str, preset: str = "fashion_lenet",
           rounds: int | None = None, density: float | None = None):
    from lottery.experiment import RunOptions
    from lottery.methods.cs import CSHparams
    from lottery.pipelines.cs import CSJob, run_cs
    from lottery.presets import get_preset

    p = get_preset(preset)
    cs = CSHparams.from_dict(p.methods["cs"])
    cs = cs.replace(density=density) if density is not None else cs.replace(s0=s0, lam=lam)
    if rounds is not None:
        cs = cs.replace(rounds=rounds)
    return run_cs(CSJob(p.data, p.model, p.training, cs, seed=seed), RunOptions(out=out, progress=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--s0", default="0.05,0,-0.05,-0.1")
    ap.add_argument("--lam", default="1e-8")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", default="", help="comma-separated numbers of CS rounds (default: the preset's)")
    ap.add_argument("--density", default="", help="comma-separated target densities (instead of --s0 / --lam)")
    ap.add_argument("--preset", default="fashion_lenet", help="the recipe (data, model, training, CS settings)")
    ap.add_argument("--out", default="benchmarks/out/cs_lenet_fashion")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    s0s = [float(s) for s in args.s0.split(",")]
    lams = [float(s) for s in args.lam.split(",")]
    rounds_list = [int(r) for r in args.rounds.split(",") if r.strip()] or [None]

    if args.density:
        densities = [float(d) for d in args.density.split(",")]
        dense = run_parallel(dense_job, [(s, args.out, args.preset) for s in seeds], args.workers)
        cs = run_parallel(cs_job, [(None, None, s, args.out, args.preset, n, d) for n in rounds_list
                                   for d in densities for s in seeds], args.workers)
        print_density_table(args.preset, dense, cs, densities, rounds_list)
        return
    dense = run_parallel(dense_job, [(s, args.out, args.preset) for s in seeds], args.workers)
    cs = run_parallel(cs_job, [(s0, lam, s, args.out, args.preset, n) for n in rounds_list for s0 in s0s
                               for lam in lams for s in seeds], args.workers)

    print(f"machine: {machine()}\npreset: {args.preset}\n")
    m, sd = mean_std([r["test_accuracy"] for r in dense])
    em, _ = mean_std([r["epochs"] for r in dense])
    wm, wsd = mean_std([r["wall_seconds"] for r in dense])
    print("| network | density | test accuracy % (mean ± std) | epochs | wall s (mean ± std) | seeds |")
    print("|---|---|---|---|---|---|")
    print(f"| dense | 1.0000 | {100 * m:.2f} ± {100 * sd:.2f} | {em:.0f} | {wm:.0f} ± {wsd:.0f} | {len(dense)} |")
    dense_mean = m
    for rounds, s0, lam in ((n, s0, lam) for n in rounds_list for s0 in s0s for lam in lams):
        rs = [r for r in cs if r["s0"] == s0 and r["lam"] == lam and rounds in (None, r["rounds"])]
        d, dsd = mean_std([r["density"] for r in rs])
        a, asd = mean_std([r["test_accuracy"] for r in rs])
        e, _ = mean_std([r["epochs"] for r in rs])
        w, wsd = mean_std([r["wall_seconds"] for r in rs])
        gap = 100 * (a - dense_mean)
        name = f"s0={s0:g} lam={lam:g}" + (f" rounds={rounds}" if rounds is not None else "")
        print(f"| CS ticket {name} | {d:.4f} ± {dsd:.4f} | {100 * a:.2f} ± {100 * asd:.2f} "
              f"({gap:+.2f} vs dense) | {e:.0f} | {w:.0f} ± {wsd:.0f} | {len(rs)} |")



def print_density_table(preset: str, dense: list, cs: list, densities: list, rounds_list: list) -> None:
    print(f"machine: {machine()}\npreset: {preset}\n")
    m, sd = mean_std([r["test_accuracy"] for r in dense])
    print("| network | density (mean ± std) | test accuracy % (mean ± std) | vs dense | every round's mask binary "
          "(worst undecided %, worst soft-hard gap) | epochs | seeds |")
    print("|---|---|---|---|---|---|---|")
    print(f"| dense | 1.0000 | {100 * m:.2f} ± {100 * sd:.2f} | | | {mean_std([r['epochs'] for r in dense])[0]:.0f} | {len(dense)} |")
    for rounds, target in ((n, d) for n in rounds_list for d in densities):
        rs = [r for r in cs if r.get("target_density") == target and rounds in (None, r["rounds"])]
        d, dsd = mean_std([r["density"] for r in rs])
        a, asd = mean_std([r["test_accuracy"] for r in rs])
        conv = [c for r in rs for c in r.get("convergence") or []]
        ok = "yes" if conv and all(c["converged"] for c in conv) else "NO"
        worst = (f"{100 * max(c['undecided'] for c in conv):.2f} %, {100 * max(abs(c['soft_hard_gap']) for c in conv):.2f}"
                 if conv else "-")
        name = f"CS ticket, density {target:g}" + (f", {rounds} rounds" if rounds is not None else "")
        print(f"| {name} | {d:.4f} ± {dsd:.4f} | {100 * a:.2f} ± {100 * asd:.2f} | {100 * (a - m):+.2f} | {ok} ({worst}) "
              f"| {mean_std([r['epochs'] for r in rs])[0]:.0f} | {len(rs)} |")


if __name__ == "__main__":
    main()
