"""Stochastic L0 (hard concrete gates) and gradual magnitude pruning beside CS and IMP on LeNet-300-100 /
Fashion-MNIST, with the same recipe (the fashion_lenet preset: 40 epochs, SGD lr 0.1, batch 128) and
several seeds.

* stochastic L0 (Louizos et al. 2018), one gate per weight, over a range of ``lam``: tickets (mask applied
  to the rewind point 1ep, as the CS preset, and retrained) and pruned networks (final weights x gates),
  both from one search per setting and seed (the pruned run reuses the ticket run's search);
* GMP (Zhu & Gupta 2017) to IMP's densities 0.8^L, pruning from epoch 2 to 75% of training every 100
  iterations, then training on at the final density;
* CS and IMP: read from the run folders of benchmarks/cs_lenet_fashion.py and imp_lenet_fashion.py
  (--cs-out, --imp-out) when they are there; this script does not train them.

Prints Markdown tables: mean ± sample std over seeds of density and test accuracy per setting, and the
spread across seeds of each method's density and accuracy (the CS paper's claim: CS is more stable
across runs than stochastic L0). Every run is a normal lottery run folder under --out, so a killed
benchmark resumes and a finished one is reused.

    python benchmarks/l0_gmp_lenet_fashion.py --seeds 0,1,2 --workers 2
    python benchmarks/l0_gmp_lenet_fashion.py --report-only      # tables of whatever has finished
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, mean_std, run_parallel  # noqa: E402

PRESET = "fashion_lenet"
L0_REWIND = "1ep"  # the CS preset's rewind point, so that L0 and CS tickets are retrained alike


def dense_job(seed: int, out: str):
    from lottery.experiment import DenseJob, RunOptions, train_dense
    from lottery.presets import get_preset

    p = get_preset(PRESET)
    return train_dense(DenseJob(p.data, p.model, p.training, seed=seed), RunOptions(out=out, progress=False))


def l0_hparams(lam: float):
    from lottery.methods.l0 import L0Hparams

    return L0Hparams(lam=lam, rewind=L0_REWIND)


def l0_job(lam: float, mode: str, seed: int, out: str):
    from lottery.experiment import RunOptions
    from lottery.pipelines.l0 import L0Job, run_l0
    from lottery.presets import get_preset

    p = get_preset(PRESET)
    job = L0Job(p.data, p.model, p.training, l0_hparams(lam), seed=seed, mode=mode)
    return run_l0(job, RunOptions(out=out, progress=False))


def gmp_job(density: float, seed: int, out: str):
    from lottery.experiment import RunOptions
    from lottery.methods.gmp import GMPHparams
    from lottery.pipelines.gmp import GMPJob, run_gmp
    from lottery.presets import get_preset

    p = get_preset(PRESET)
    job = GMPJob(p.data, p.model, p.training, GMPHparams(density=density), seed=seed)
    return run_gmp(job, RunOptions(out=out, progress=False))


def imp_density(level: int) -> float:
    """The target density of GMP for IMP level L: 0.8^L (rounded to 6 decimals, so it is exact)."""
    return round(0.8 ** level, 6)


# -- reading finished runs ----------------------------------------------------------------------------
def _read(pattern: str, root: Path) -> list[dict]:
    found = []
    if not root.is_dir():
        return found
    for path in sorted(root.glob(pattern)):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return found


def _ok(r: dict, seeds: list[int]) -> bool:
    from lottery.presets import get_preset

    p = get_preset(PRESET)
    return (r.get("seed") in seeds and r.get("test_accuracy") is not None and r.get("density") is not None
            and r.get("model") == p.model.model and r.get("dataset") == p.data.dataset)


def gather(out: Path, cs_out: Path, imp_out: Path, seeds: list[int], lams: list[float], gmp_levels: list[int]):
    """{(method, setting): [results of one seed each]}, in the order the tables show them."""
    groups: dict[tuple[str, str], list[dict]] = {}

    def add(method: str, setting: str, r: dict) -> None:
        rows = groups.setdefault((method, setting), [])
        if all(x.get("seed") != r.get("seed") for x in rows):  # one run per seed
            rows.append(r)

    dense = [r for r in _read("train_*/results.json", out) if _ok(r, seeds)]
    if not dense:  # the dense runs of the CS benchmark are the same recipe and seeds
        dense = [r for r in _read("train_*/results.json", cs_out) if _ok(r, seeds)]
    for r in dense:
        add("dense", "-", r)
    for mode, kind in (("ticket", "search-l0"), ("prune", "prune-l0")):
        runs = [r for r in _read(f"{kind}_*/results.json", out) if _ok(r, seeds)]
        for lam in lams:
            for r in runs:
                if r.get("lam") == lam and (mode == "prune" or r.get("rewind") == L0_REWIND):
                    add(f"L0 {mode}", f"lam={lam:g}", r)
    gmp = [r for r in _read("prune-gmp_*/results.json", out) if _ok(r, seeds)]
    for level in gmp_levels:
        for r in gmp:
            if r.get("target_density") == imp_density(level) and r.get("scope") == "global":
                add("GMP", f"0.8^{level}", r)
    cs = [r for r in _read("search-cs_*/results.json", cs_out) if _ok(r, seeds)]
    for key in sorted({(r.get("s0"), r.get("lam")) for r in cs}, key=lambda k: (-(k[0] or 0), k[1] or 0)):
        for r in cs:
            if (r.get("s0"), r.get("lam")) == key:
                add("CS ticket", f"s0={key[0]:g} lam={key[1]:g}", r)
    imp_levels = _read("search-imp*/level_*/results.json", imp_out)
    for name, keep in (("IMP k=0", lambda r: r.get("method") == "imp" and r.get("rewind") in ("0it", None)),
                       ("IMP-R k=1ep", lambda r: r.get("method") == "imp" and r.get("rewind") == "1ep"),
                       ("IMP-C k=1ep", lambda r: r.get("method") == "imp-c")):
        for level in sorted({r.get("level") for r in imp_levels if keep(r) and r.get("level")}):
            if level not in gmp_levels:
                continue
            for r in imp_levels:
                if keep(r) and r.get("level") == level and _ok(r, seeds):
                    add(name, f"level {level}", r)
    return groups


def _var(xs: list[float]) -> float:
    return statistics.variance(xs) if len(xs) > 1 else 0.0


def report(groups: dict, seeds: list[int]) -> None:
    print(f"machine: {machine()}\n")
    from lottery.presets import get_preset

    p = get_preset(PRESET)
    print(f"recipe: {PRESET} preset ({p.model.model}, {p.data.dataset}, {p.training.training_steps}, lr {p.training.lr:g}, "
          f"batch {p.training.batch_size}); seeds {','.join(map(str, seeds))}; L0 tickets rewound to {L0_REWIND}; "
          "std = sample standard deviation over seeds\n")
    dense_runs = groups.get(("dense", "-"), [])
    dense_mean, _ = mean_std([r["test_accuracy"] for r in dense_runs])
    print("| method | setting | density (mean ± std) | test accuracy % (mean ± std) | vs dense | epochs | seeds |")
    print("|---|---|---|---|---|---|---|")
    for (method, setting), rs in groups.items():
        d, dsd = mean_std([r["density"] for r in rs])
        a, asd = mean_std([r["test_accuracy"] for r in rs])
        e, _ = mean_std([r.get("epochs") for r in rs])
        gap = "-" if method == "dense" or not dense_runs else f"{100 * (a - dense_mean):+.2f}"
        print(f"| {method} | {setting} | {d:.4f} ± {dsd:.4f} | {100 * a:.2f} ± {100 * asd:.2f} | {gap} | "
              f"{e:.0f} | {len(rs)} |")

    print("\nSpread across seeds, per setting (density variance in units of 1e-6; accuracy variance in %^2). "
          "GMP and IMP prune to a fixed count, so their density does not vary by construction.\n")
    print("| method | setting | density std | density var (1e-6) | accuracy std (%) | accuracy var (%^2) | seeds |")
    print("|---|---|---|---|---|---|---|")
    per_method: dict[str, list[tuple[float, float, float, float]]] = {}
    for (method, setting), rs in groups.items():
        if len(rs) < 2:
            continue
        dens = [r["density"] for r in rs]
        accs = [100 * r["test_accuracy"] for r in rs]
        row = (statistics.stdev(dens), _var(dens), statistics.stdev(accs), _var(accs))
        per_method.setdefault(method, []).append(row)
        print(f"| {method} | {setting} | {row[0]:.4f} | {1e6 * row[1]:.2f} | {row[2]:.2f} | {row[3]:.3f} | {len(rs)} |")

    print("\nSpread across seeds, per method (mean over its settings with at least two seeds):\n")
    print("| method | settings | mean density std | mean density var (1e-6) | mean accuracy std (%) | "
          "mean accuracy var (%^2) |")
    print("|---|---|---|---|---|---|")
    for method, rows in per_method.items():
        cols = [statistics.fmean(c) for c in zip(*rows)]
        print(f"| {method} | {len(rows)} | {cols[0]:.4f} | {1e6 * cols[1]:.2f} | {cols[2]:.2f} | {cols[3]:.3f} |")
    missing = [m for m in ("CS ticket", "IMP-R k=1ep") if m not in {k[0] for k in groups}]
    if missing:
        print(f"\n(no finished runs found for: {', '.join(missing)}; run benchmarks/cs_lenet_fashion.py and "
              "benchmarks/imp_lenet_fashion.py, or point --cs-out / --imp-out at their folders)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lam", default="1e-6,3e-6,1e-5,3e-5,1e-4", help="comma-separated L0 penalty weights")
    ap.add_argument("--gmp-levels", default="2,4,6,8,10,12", help="GMP to the densities 0.8^L of these IMP levels")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/out/l0_gmp_lenet_fashion")
    ap.add_argument("--cs-out", default="benchmarks/out/cs_lenet_fashion", help="run folders of the CS benchmark")
    ap.add_argument("--imp-out", default="benchmarks/out/imp_lenet_fashion", help="run folders of the IMP benchmark")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: ticket,prune,gmp")
    ap.add_argument("--report-only", action="store_true", help="print the tables of the finished runs; train nothing")
    args = ap.parse_args()
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    lams = [float(s) for s in args.lam.split(",") if s.strip()]
    levels = [int(s) for s in args.gmp_levels.split(",") if s.strip()]
    skip = set(args.skip.split(",")) - {""}
    if not args.report_only:
        # Dense references first, so that no two workers train the same one.
        run_parallel(dense_job, [(s, str(out)) for s in seeds], args.workers)
        jobs = []
        if "ticket" not in skip:
            jobs += [(l0_job, (lam, "ticket", s, str(out))) for lam in lams for s in seeds]
        if "gmp" not in skip:
            jobs += [(gmp_job, (imp_density(level), s, str(out))) for level in levels for s in seeds]
        run_parallel(_call, jobs, args.workers)
        # After the tickets: a pruned network of the same setting reuses its ticket run's finished search
        # (the search is the same in both modes), so this is an evaluation per run, not a second search.
        if "prune" not in skip:
            run_parallel(_call, [(l0_job, (lam, "prune", s, str(out))) for lam in lams for s in seeds], args.workers)
    report(gather(out, Path(args.cs_out), Path(args.imp_out), seeds, lams, levels), seeds)


def _call(fn, job_args):
    return fn(*job_args)


if __name__ == "__main__":
    main()
