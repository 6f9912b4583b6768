"""Instability with BatchNorm statistics recomputed on the line, beside the blended ones the runs report.

Why: lottery's stability analysis (lottery.methods.stability) blends every tensor of the two copies' states,
BatchNorm running statistics included. On the line those statistics are not the ones the blended weights
produce on the data, so part of a measured barrier in a BN network (ResNet-20) can be stale statistics
rather than a loss barrier. This script reads finished stability run folders (the two copies' final states,
``k_*/copy_{0,1}.safetensors``), evaluates the line again with the statistics recomputed at every point from
training batches (``reestimate_batchnorm``), and prints both instabilities side by side. Nothing is trained
and the run folders are only read; the table goes to stdout and, with ``--json``, to a file.

    .venv/bin/python benchmarks/stability_bn.py benchmarks/out/resnet_fashion [--points 11] [--bn-batches 50] \\
        [--json benchmarks/out/resnet_fashion/stability_bn.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, mean_std  # noqa: E402


def analyse(folder: Path, points: int, bn_batches: int) -> list[dict]:
    import torch

    from lottery import masking
    from lottery.experiment import RunOptions, build_model, load_data, make_loaders
    from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
    from lottery.io import load_tensors, read_json
    from lottery.masks import Mask
    from lottery.methods.stability import instability

    desc = read_json(folder / "hparams.json")
    data, model_hp = DataHparams.from_dict(desc["data"]), ModelHparams.from_dict(desc["model"])
    training = TrainingHparams.from_dict(desc["training"])
    options = RunOptions(out=folder.parent, progress=False)
    bundle = load_data(data, options)
    mask_file = desc["stability"].get("mask")
    mask = Mask.load(mask_file) if mask_file else None

    def build():
        net = build_model(model_hp, bundle, desc["seed"])
        if mask is not None:
            masking.attach_hard_mask(net, mask)
        return net

    rows = []
    for kdir in sorted(folder.glob("k_*"), key=lambda p: read_json(p / "result.json")["rewind_iteration"]
                       if (p / "result.json").exists() else 1 << 60):
        if not (kdir / "result.json").exists():
            continue
        reported = read_json(kdir / "result.json")
        a, b = (load_tensors(kdir / f"copy_{i}.safetensors") for i in range(2))
        train, evals = make_loaders(bundle, training, desc["seed"], options)
        torch.manual_seed(0)
        blended = instability(build, a, b, evals["test"], points)
        fresh = instability(build, a, b, evals["test"], points, bn_loader=train, bn_batches=bn_batches)
        rows.append({"run": folder.name, "seed": desc["seed"], "density": reported.get("density", 1.0),
                     "rewind": reported["rewind"], "reported_instability": reported["instability"],
                     "blended_instability": blended["instability"], "bn_instability": fresh["instability"],
                     "bn_error_a": fresh["error_a"], "bn_error_b": fresh["error_b"], "bn_max_error": fresh["max_error"],
                     "blended_errors": blended["errors"], "bn_errors": fresh["errors"]})
        print(f"{folder.name} k={reported['rewind']}: instability blended {100 * blended['instability']:.2f} "
              f"(the run's own at {desc['stability']['points']} points: {100 * reported['instability']:.2f}), "
              f"BN recomputed {100 * fresh['instability']:.2f} points", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="a folder of stability run folders (stability_*), or one such folder")
    ap.add_argument("--points", type=int, default=11, help="points on the line, end points included (default 11)")
    ap.add_argument("--bn-batches", type=int, default=50, help="training batches per recomputation (default 50)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    import torch

    from lottery.errors import ConfigError
    from lottery.io import write_json

    torch.set_num_threads(args.threads)
    folders = [args.root] if (args.root / "hparams.json").exists() else sorted(args.root.glob("stability_*"))
    if not folders:
        raise SystemExit(str(ConfigError(f"no stability run folders in {args.root}; pass a folder of stability_* runs")))
    rows = [r for f in folders for r in analyse(f, args.points, args.bn_batches)]
    print(f"\n{machine()}; {args.points} points, {args.bn_batches} training batches per recomputation\n")
    print("| density | k | seeds | instability, blended statistics (points) | instability, statistics recomputed (points) |")
    print("|---|---|---|---|---|")
    for key in sorted({(r["density"], r["rewind"]) for r in rows}, key=lambda t: (-t[0], t[1])):
        group = [r for r in rows if (r["density"], r["rewind"]) == key]
        mb, sb = mean_std([100 * r["blended_instability"] for r in group])
        mf, sf = mean_std([100 * r["bn_instability"] for r in group])
        print(f"| {key[0]:.4f} | {key[1]} | {len(group)} | {mb:.2f} ± {sb:.2f} | {mf:.2f} ± {sf:.2f} |")
    if args.json is not None:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
