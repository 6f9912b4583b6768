"""IMP (k=0), IMP with rewinding, IMP-C and random-pruning controls on LeNet-300-100 / Fashion-MNIST,
plus instability against the rewind point k for the dense network. Same recipe as the CS benchmark
(the fashion_lenet preset: 40 epochs, SGD lr 0.1, batch 128), several seeds, resumable. --preset runs
another recipe (e.g. fashion_conv4_narrow, the CPU convolutional network; IMP-R rewinds to --rewind).

    python benchmarks/imp_lenet_fashion.py --seeds 0,1,2 --levels 12 --workers 2
    python benchmarks/imp_lenet_fashion.py --preset fashion_conv4_narrow --rewind 100it --levels 12 \
        --skip stability --out benchmarks/out/imp_conv_fashion
    python benchmarks/imp_lenet_fashion.py --report-only      # tables of whatever has finished
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, mean_std, read_results, run_parallel  # noqa: E402

CONTROL_LEVELS = (2, 4, 6, 8, 10, 12)
STABILITY_POINTS = ("0it", "100it", "1ep", "5ep")


def imp_job(variant: str, rewind: str, levels: int, seed: int, out: str, preset: str = "fashion_lenet"):
    from lottery.experiment import RunOptions
    from lottery.methods.imp import IMPHparams
    from lottery.pipelines.imp import IMPJob, run_imp
    from lottery.presets import get_preset

    p = get_preset(preset)
    hp = IMPHparams(levels=levels, rewind=rewind, variant=variant)
    return run_imp(IMPJob(p.data, p.model, p.training, hp, seed=seed), RunOptions(out=out, progress=False))


def control_job(source: str, level: int, seed: int, out: str):
    from lottery.experiment import RunOptions
    from lottery.methods.imp import RandomPruneHparams
    from lottery.pipelines.imp import run_random_prune

    return run_random_prune(source, RandomPruneHparams(level=level, seed=seed, scope="layerwise"),
                            RunOptions(out=out, progress=False))


def stability_job(seed: int, out: str, preset: str = "fashion_lenet", points=STABILITY_POINTS):
    from lottery.experiment import RunOptions
    from lottery.methods.stability import StabilityHparams
    from lottery.pipelines.imp import StabilityJob, run_stability
    from lottery.presets import get_preset

    p = get_preset(preset)
    hp = StabilityHparams(rewind_points=tuple(points), copy_seeds=(101 + seed, 201 + seed))
    return run_stability(StabilityJob(p.data, p.model, p.training, hp, seed=seed), RunOptions(out=out, progress=False))


def _finished(out: Path, prefix: str) -> list[dict]:
    return [r for _, r in read_results(out, f"{prefix}*/results.json")]


def report(out: Path, levels: int, rewind: str = "1ep", control_levels=CONTROL_LEVELS,
           points=STABILITY_POINTS) -> None:
    print(f"machine: {machine()}\n")
    series = {
        "IMP k=0": [r for r in _finished(out, "search-imp_") if r.get("rewind") in ("0it", None) and r.get("method") == "imp"],
        f"IMP-R k={rewind}": [r for r in _finished(out, "search-imp_") if r.get("rewind") == rewind],
        f"IMP-C k={rewind}": _finished(out, "search-imp-c_"),
    }
    print("| method | level | density | test accuracy % (mean ± std) | epochs | seeds |")
    print("|---|---|---|---|---|---|")
    for name, runs in series.items():
        for level in range(levels + 1):
            rows = [lv for r in runs for lv in r.get("levels", []) if lv["level"] == level]
            if not rows:
                continue
            a, asd = mean_std([lv["test_accuracy"] for lv in rows])
            d, _ = mean_std([lv["density"] for lv in rows])
            e, _ = mean_std([lv["epochs"] for lv in rows])
            print(f"| {name} | {level} | {d:.4f} | {100 * a:.2f} ± {100 * asd:.2f} | {e:.0f} | {len(rows)} |")
    controls = [r for _, r in read_results(out, "*random-prune*/results.json")]
    for level in control_levels:
        rows = [r for r in controls if r.get("level") == level]
        if rows:
            a, asd = mean_std([r["test_accuracy"] for r in rows])
            d, _ = mean_std([r["density"] for r in rows])
            print(f"| random pruning (layerwise, IMP-R masks' counts) | {level} | {d:.4f} | {100 * a:.2f} ± {100 * asd:.2f} | - | {len(rows)} |")
    stab = _finished(out, "stability_")
    if stab:
        print("\n| k | instability % (mean ± std) | L2 distance to dense (mean) | seeds |")
        print("|---|---|---|---|")
        for k in points:
            rows = [p for r in stab for p in r.get("rows", []) if p.get("rewind") == k]
            if rows:
                i, isd = mean_std([p["instability"] for p in rows])
                dist, _ = mean_std([p["l2_to_dense"] for p in rows])
                print(f"| {k} | {100 * i:.2f} ± {100 * isd:.2f} | {dist:.3f} | {len(rows)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--levels", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--preset", default="fashion_lenet", help="the recipe (data, model, training)")
    ap.add_argument("--rewind", default="1ep", help="rewind point of IMP-R and IMP-C")
    ap.add_argument("--control-levels", default=",".join(map(str, CONTROL_LEVELS)),
                    help="IMP-R levels whose masks' per-layer counts the random controls copy")
    ap.add_argument("--out", default="benchmarks/out/imp_lenet_fashion")
    ap.add_argument("--stability-points", default=",".join(STABILITY_POINTS),
                    help="rewind points k of the dense network's instability analysis")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: imp0,impr,stability,controls,impc")
    args = ap.parse_args()
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    skip = set(args.skip.split(",")) - {""}
    control_levels = [int(v) for v in args.control_levels.split(",") if v]
    points = [p.strip() for p in args.stability_points.split(",") if p.strip()]
    if not args.report_only:
        first = []
        if "impr" not in skip:
            first += [("rewind", args.rewind, args.levels, s, str(out), args.preset) for s in seeds]
        if "imp0" not in skip:
            first += [("rewind", "0it", args.levels, s, str(out), args.preset) for s in seeds]
        done = run_parallel(imp_job, first, args.workers)
        if "stability" not in skip:
            run_parallel(stability_job, [(s, str(out), args.preset, points) for s in seeds], args.workers)
        if "controls" not in skip:
            sources = [r["run_dir"] for r in done if r.get("rewind") == args.rewind]
            run_parallel(control_job, [(src, lv, 1, str(out)) for src in sources for lv in control_levels],
                         args.workers)
        if "impc" not in skip:
            run_parallel(imp_job, [("continue", args.rewind, args.levels, s, str(out), args.preset) for s in seeds],
                         args.workers)
    report(out, args.levels, args.rewind, control_levels, points)


if __name__ == "__main__":
    main()
