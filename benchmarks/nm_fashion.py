"""N:M tickets (issue 22, part 2) beside the unstructured tickets they come from: accuracy, 3 seeds, on
LeNet-300-100 (``fashion_lenet``) and Conv-4 at width 0.125 (``fashion_conv4_narrow``) / Fashion-MNIST.

Per preset and seed, at N:M = ``--nm`` (2:4 by default, i.e. at most half of the weights):

* **IMP-R** (unstructured): level 0 is the dense network; one level of layerwise magnitude pruning at rate
  ``1 - N/M`` (50 % for 2:4), retrained from the rewind point: the unstructured ticket at N:M's density;
* **IMP-N:M**: magnitude pruning *within each group* of the dense network's trained weights (the N largest
  ``|w|`` of every M consecutive input weights: ``lottery structure nm IMP_RUN --level 0``), retrained from
  the same rewind point: IMP with N:M as its granularity at the level where the density reaches N/M;
* **IMP-R + N:M**: the N:M post-processing of the IMP-R ticket (``structure nm`` of its level 1: within
  each group the kept weights of largest ``|w|``; a subset of the ticket, so sparser than N/M), retrained;
* **CS** (unstructured): a CS ticket search with ``--density`` N/M (lottery's default CS recipe);
* **CS-N:M**: the N:M post-processing of the CS ticket with the search's mask logits deciding within each
  group (``structure nm`` after CS), retrained from the CS rewind point.

Every network of a preset trains with the same recipe; LeNet's is shortened to ``--lenet-epochs`` (10) with
CS in 2 rounds of half that, so that the whole benchmark fits in about 20 minutes on 2 CPU cores (the
preset's 40 epochs and 3 x 20-epoch CS rounds would take hours). Conv-4 narrow keeps its preset (3 epochs;
CS 3 rounds of 2 epochs). Every run is a lottery run folder: a killed benchmark resumes.

    python benchmarks/nm_fashion.py --seeds 0,1,2 --workers 2
    python benchmarks/nm_fashion.py --report-only

Cost, estimated from the epoch times of benchmarks/RESULTS.md on an idle machine (LeNet about 3.3 s per
epoch, Conv-4 narrow about 18 s): per seed about 70 LeNet epochs (4-6 CPU-minutes) and 24 Conv-4 narrow
epochs (7-8 CPU-minutes), so about 20 minutes for 3 seeds on 2 workers. Measured on 2026-12-02 on the
2-core machine at load average 6-9 (other work running): one seed of Conv-4 narrow in 16 minutes and one
of LeNet at ``--lenet-epochs 2`` in 2.5 minutes (2 workers); the report's last column gives each run's
wall seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, mean_std, read_results, run_parallel  # noqa: E402

PRESETS = ("fashion_lenet", "fashion_conv4_narrow")
REWIND = {"fashion_lenet": "1ep", "fashion_conv4_narrow": "100it"}


def recipe(args: dict, preset: str):
    """(data, model, training, CS overrides) of a preset, LeNet's training shortened to --lenet-epochs."""
    from lottery.presets import get_preset

    p = get_preset(preset)
    training, cs = p.training, dict(p.methods.get("cs", {}))
    if preset == "fashion_lenet":
        epochs = int(args["lenet_epochs"])
        training = training.replace(training_steps=f"{epochs}ep")
        cs.update(rounds=2, round_steps=f"{max(1, epochs // 2)}ep")
    cs["rewind"] = REWIND[preset]
    return p.data, p.model, training, cs


def _nm_density(nm: str) -> float:
    from lottery.methods.nm import parse_nm

    n, m = parse_nm(nm)
    return n / m


def source_job(args: dict, preset: str, kind: str, seed: int) -> dict:
    from lottery.experiment import RunOptions
    from lottery.methods.cs import CSHparams
    from lottery.methods.imp import IMPHparams
    from lottery.pipelines.cs import CSJob, run_cs
    from lottery.pipelines.imp import IMPJob, run_imp

    data, model, training, cs = recipe(args, preset)
    options = RunOptions(out=Path(args["out"]) / preset, progress=False, data_dir=args["data_dir"])
    if kind == "imp":
        hp = IMPHparams(levels=1, rate=1 - _nm_density(args["nm"]), scope="layerwise", rewind=REWIND[preset])
        return run_imp(IMPJob(data, model, training, hp, seed=seed), options)
    hp = CSHparams(**cs, density=_nm_density(args["nm"]))
    return run_cs(CSJob(data, model, training, hp, seed=seed, dense_reference=False), options)


def nm_job(args: dict, preset: str, source: str, after: str, level: int | None) -> dict:
    from lottery.experiment import RunOptions
    from lottery.methods.structured import StructuredHparams
    from lottery.pipelines.structured import StructureJob, run_structure

    options = RunOptions(out=Path(args["out"]) / preset, progress=False, data_dir=args["data_dir"])
    return run_structure(StructureJob(Path(source), StructuredHparams(method="nm", nm=args["nm"]), after=after,
                                      level=level), options)


def _label(r: dict) -> str | None:
    kind = r.get("kind", "")
    if kind == "search-cs":
        return "CS"
    if kind.startswith("structure-nm"):
        if r.get("after") == "cs":
            return "CS-N:M (logits within each group)"
        return "IMP-N:M (magnitude within each group, from dense)" if r.get("level") == 0 else "IMP-R + N:M"
    return None


def report(out: Path, nm: str) -> None:
    from lottery.methods.nm import parse_nm, satisfies_nm
    from lottery.masks import Mask

    n, m = parse_nm(nm)
    print(f"report made on: {machine()}\n")
    for preset in PRESETS:
        root = out / preset
        rows: dict[str, list[dict]] = {}
        for _, r in read_results(root, "search-imp_*/results.json"):
            levels = r.get("levels") or []
            if len(levels) >= 2:
                rows.setdefault("dense (IMP level 0)", []).append(levels[0])
                rows.setdefault("IMP-R (unstructured, layerwise)", []).append(levels[1])
        for folder, r in read_results(root, "search-cs_*/results.json") + read_results(root, "structure-nm_*/results.json"):
            label = _label(r)
            if label is None:
                continue
            if label != "CS":  # every N:M ticket's saved mask satisfies N:M (checked here, not assumed)
                r = {**r, "nm_ok": satisfies_nm(Mask.load(folder / "mask.safetensors"), n, m)}
            rows.setdefault(label, []).append(r)
        if not rows:
            continue
        dense = [r["test_accuracy"] for r in rows.get("dense (IMP level 0)", [])]
        d_mean = mean_std(dense)[0]
        print(f"### {preset} (N:M = {nm})\n")
        print("| ticket | density | test acc % (mean ± std) | Δ vs dense (points) | N:M holds | seeds | wall s per run |")
        print("|---|---|---|---|---|---|---|")
        order = ["dense (IMP level 0)", "IMP-R (unstructured, layerwise)", "IMP-N:M (magnitude within each group, from dense)",
                 "IMP-R + N:M", "CS", "CS-N:M (logits within each group)"]
        for label in order:
            runs = rows.get(label, [])
            if not runs:
                continue
            a, sd = mean_std([r["test_accuracy"] for r in runs])
            dens = mean_std([r.get("density", 1.0) for r in runs])[0]
            ok = "-" if "nm_ok" not in runs[0] else ("yes" if all(r["nm_ok"] for r in runs) else "NO")
            wall = mean_std([r.get("wall_seconds") for r in runs])[0]
            print(f"| {label} | {dens:.4f} | {100 * a:.2f} ± {100 * sd:.2f} | {100 * (a - d_mean):+.2f} | {ok} | "
                  f"{len(runs)} | {wall:.0f} |")
        print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--nm", default="2:4", help="N:M sparsity, e.g. 2:4")
    ap.add_argument("--lenet-epochs", type=int, default=10, help="training epochs of every LeNet network")
    ap.add_argument("--out", default="benchmarks/out/nm_fashion")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    from lottery.errors import ConfigError
    from lottery.methods.nm import parse_nm

    try:
        parse_nm(args.nm)
    except ConfigError as exc:
        ap.error(str(exc))
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if not presets or set(presets) - set(PRESETS):
        ap.error(f"--presets takes a comma-separated subset of {','.join(PRESETS)}, got {args.presets!r}")
    if args.lenet_epochs < 2:
        ap.error(f"--lenet-epochs must be at least 2 (CS runs 2 rounds of half of it), got {args.lenet_epochs}")
    out = Path(args.out)
    cfg = {"out": str(out), "nm": args.nm, "lenet_epochs": args.lenet_epochs, "data_dir": args.data_dir}
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.report_only:
        jobs = [(cfg, p, kind, s) for s in seeds for p in presets for kind in ("cs", "imp")]  # CS first: longest
        sources = run_parallel(source_job, jobs, args.workers)
        nm_jobs = []
        for (_, preset, kind, _), r in zip(jobs, sources):
            if kind == "imp":
                nm_jobs += [(cfg, preset, r["run_dir"], "imp", 0), (cfg, preset, r["run_dir"], "imp", 1)]
            else:
                nm_jobs.append((cfg, preset, r["run_dir"], "cs", None))
        run_parallel(nm_job, nm_jobs, args.workers)
    report(out, args.nm)


if __name__ == "__main__":
    main()
