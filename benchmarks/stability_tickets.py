"""Stability of CS and IMP tickets at comparable density (LeNet-300-100 / Fashion-MNIST, fashion_lenet
recipe): for each rewind point k, two copies of the sparse network start from the dense run's state at
k times the ticket's mask and train to the end with different data orders; the test-error barrier on the
line between them is the instability, and their L2 distance to the trained dense network the distance
(Frankle et al., linear mode connectivity). The masks come from the finished runs of the CS and IMP
benchmarks (no search here): CS ``s0 = 0`` (16.3 % density) and IMP-R (k = 1ep) level 8 (16.8 %), per seed.

    python benchmarks/stability_tickets.py --seeds 0,1,2 --workers 2                  # k = 0it, 1ep
    python benchmarks/stability_tickets.py --seeds 0,1,2 --workers 2 --points 100it,5ep
    python benchmarks/stability_tickets.py --report-only       # every finished k, from the run folders

Another recipe (issue 21, ResNet-20): ``--preset fashion_resnet20``, CS tickets picked by their target
density (``--cs-density 0.1678``, runs of ``lottery sweep cs --density``) and IMP-R by its rewind point:

    python benchmarks/stability_tickets.py --preset fashion_resnet20 --cs-density 0.1678 --imp-rewind K \
        --imp-level 8 --points 0it,K --cs-out benchmarks/out/resnet_fashion --imp-out benchmarks/out/resnet_fashion \
        --out benchmarks/out/resnet_fashion

Each --points set is its own stability run (its own dense reference run, deterministic per seed).

The dense network's own instability at the same k is in the IMP benchmark (benchmarks/imp_lenet_fashion.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, mean_std, read_results, run_parallel  # noqa: E402

POINTS = ("0it", "1ep")
REPORT_ORDER = ("0it", "100it", "1ep", "5ep")


def find_masks(cs_out: Path, imp_out: Path, seed: int, cs_s0: float, imp_level: int, cs_density: float | None = None,
               imp_rewind: str = "1ep", cs_rewind: str | None = None) -> dict[str, Path]:
    """{ticket name: mask file} of one seed, from the finished CS and IMP-R runs: the CS run with that
    ``s0`` (or, given ``cs_density``, the one searched for that target density; given ``cs_rewind``, only
    tickets rewound there) and IMP-R's level. Two CS runs that both fit are refused, not picked between."""
    masks = {}
    cs = []
    for folder, r in read_results(cs_out, "search-cs_*/results.json"):
        picked = r.get("target_density") == cs_density if cs_density is not None else (
            r.get("s0") == cs_s0 and r.get("target_density") is None)
        if (r.get("seed") == seed and picked and r.get("mode") == "ticket"
                and (cs_rewind is None or r.get("rewind") == cs_rewind)):
            cs.append(folder)
    if len(cs) > 1:
        raise ValueError(f"seed {seed}: {len(cs)} CS tickets fit ({', '.join(f.name for f in cs)}); "
                         "name the rewind point of the one to analyse (--cs-rewind)")
    if cs:
        masks["CS"] = cs[0] / "mask.safetensors"
    for folder, r in read_results(imp_out, "search-imp_*/results.json"):
        if r.get("seed") == seed and r.get("method") == "imp" and r.get("rewind") == imp_rewind:
            path = folder / f"level_{imp_level}" / "mask.safetensors"
            if path.exists():
                masks["IMP-R"] = path
    return masks


def stability_job(mask: str, seed: int, out: str, points: tuple[str, ...] = POINTS, preset: str = "fashion_lenet"):
    from lottery.experiment import RunOptions
    from lottery.methods.stability import StabilityHparams
    from lottery.pipelines.imp import StabilityJob, run_stability
    from lottery.presets import get_preset

    p = get_preset(preset)
    hp = StabilityHparams(rewind_points=tuple(points), copy_seeds=(101 + seed, 201 + seed), mask=mask)
    return run_stability(StabilityJob(p.data, p.model, p.training, hp, seed=seed), RunOptions(out=out, progress=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/out/stability_tickets")
    ap.add_argument("--cs-out", default="benchmarks/out/cs_lenet_fashion")
    ap.add_argument("--imp-out", default="benchmarks/out/imp_lenet_fashion")
    ap.add_argument("--preset", default="fashion_lenet", help="the recipe the tickets were found with")
    ap.add_argument("--cs-s0", type=float, default=0.0)
    ap.add_argument("--cs-density", type=float, default=None,
                    help="pick the CS runs searched for this target density (--density) instead of by s0")
    ap.add_argument("--imp-rewind", default="1ep", help="the IMP-R runs' rewind point")
    ap.add_argument("--cs-rewind", default=None, help="only CS tickets rewound to this point (default: any)")
    ap.add_argument("--imp-level", type=int, default=8)
    ap.add_argument("--points", default=",".join(POINTS), help="rewind points k of this run")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    points = tuple(p.strip() for p in args.points.split(",") if p.strip())
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    jobs, names = [], {}
    for seed in seeds:
        try:
            masks = find_masks(Path(args.cs_out), Path(args.imp_out), seed, args.cs_s0, args.imp_level, args.cs_density,
                               args.imp_rewind, args.cs_rewind)
        except ValueError as e:
            sys.exit(str(e))
        if set(masks) != {"CS", "IMP-R"}:
            sys.exit(f"seed {seed}: missing finished runs for {sorted({'CS', 'IMP-R'} - set(masks))} under "
                     f"--cs-out / --imp-out; run benchmarks/cs_lenet_fashion.py and imp_lenet_fashion.py first")
        for name, path in masks.items():
            jobs.append((str(path), seed, args.out, points, args.preset))
            names[str(path)] = name
    if not args.report_only:
        run_parallel(stability_job, jobs, args.workers)
    results = [r for _, r in read_results(Path(args.out), "stability_*/results.json")]
    found = {p.get("rewind") for r in results for p in r.get("rows", [])}
    order = [k for k in REPORT_ORDER if k in found] + sorted(found - set(REPORT_ORDER) - {None})
    print(f"machine: {machine()}\n")
    print("| ticket | density | k | instability % (mean ± std) | L2 distance to dense (mean ± std) | seeds |")
    print("|---|---|---|---|---|---|")
    for name in ("CS", "IMP-R"):
        runs = [r for r in results if r and names.get(str(r.get("mask"))) == name]
        for k in order:
            rows = [p for r in runs for p in r.get("rows", []) if p.get("rewind") == k]
            if not rows:
                continue
            i, isd = mean_std([p["instability"] for p in rows])
            d, dsd = mean_std([p["l2_to_dense"] for p in rows])
            dens, _ = mean_std([p.get("density", float("nan")) for p in rows])
            print(f"| {name} | {dens:.4f} | {k} | {100 * i:.2f} ± {100 * isd:.2f} | {d:.3f} ± {dsd:.3f} | {len(rows)} |")


if __name__ == "__main__":
    main()
