"""Why stacked CS searches end at slightly different densities than unstacked ones (issue 23): is it
rounding, or a fault in the stacked path?

The same K CS searches of LeNet-300-100 on Fashion-MNIST (members differ in s0, share the data order, as
in ``stacked_cs_speed.py``) run three ways, each in a fresh process, keeping their run folders:

- ``stacked``: one stacked network (lottery.pipelines.cs_stacked), 1 torch thread;
- ``alone-1t``: each search unstacked (lottery.pipelines.cs.run_cs), 1 torch thread;
- ``alone-2t``: the same with 2 torch threads: a change that alters nothing but the order of floating-point
  additions inside the matrix products, so its divergence from ``alone-1t`` is what rounding alone does.

The training loss is logged every ``--log-every`` iterations (``eval_every``). For each pair (stacked
against alone-1t, alone-2t against alone-1t) it prints the relative difference of the training loss per
window of steps and the first step at which it passes 1e-5, 1e-3 and 1e-1, plus the final densities. A
fault in the stacked path would show as a jump at one step (a round boundary, the rewind, a reset) where
the thread-count pair stays at rounding level; rounding shows as a difference that starts near 1e-7 and
grows smoothly at the same pace in both pairs.

    PYTHONPATH=src python benchmarks/stacked_divergence.py [--k 2] [--log-every 10it] \
        [--out benchmarks/out/stacked_divergence]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402

MODES = ("stacked", "alone-1t", "alone-2t")


def jobs(k: int, log_every: str, synthetic: bool):
    from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
    from lottery.methods.cs import CSHparams
    from lottery.pipelines.cs import CSJob

    if synthetic:
        data = DataHparams(dataset="synthetic", synthetic_shape=(1, 28, 28), synthetic_train_size=6400,
                           synthetic_test_size=1000, val_size=1000)
    else:
        data = DataHparams(dataset="fashion-mnist", val_size=5000)
    training = TrainingHparams(training_steps="2ep", batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4,
                               schedule="constant", milestones=(), eval_every=log_every, data_order_seed=0)
    cs = CSHparams(rounds=2, round_steps="1ep", rewind="50it")
    s0s = [0.1 - 0.1 * i / max(1, k - 1) for i in range(k)]
    return [CSJob(data, ModelHparams(model="lenet_300_100"), training, cs.replace(s0=round(s0, 4)), seed=0,
                  dense_reference=False) for s0 in s0s]


def one(args) -> None:
    """Run the K searches one way, in this fresh process; print their run folders as a JSON line."""
    import torch

    from lottery.experiment import RunOptions

    torch.set_num_threads(2 if args.mode == "alone-2t" else 1)
    options = RunOptions(out=Path(args.out) / args.mode, progress=False, log=lambda line: None)
    js = jobs(args.k, args.log_every, args.synthetic)
    if args.mode == "stacked":
        from lottery.pipelines.cs_stacked import run_cs_stacked

        results = run_cs_stacked(js, options)
    else:
        from lottery.pipelines.cs import run_cs

        results = [run_cs(j, options) for j in js]
    print(json.dumps([{"run_dir": str(r["run_dir"]), "density": r["density"]} for r in results]))


def losses(run_dir: Path) -> dict[tuple[str, int], float]:
    with open(run_dir / "metrics.csv") as f:
        return {(r["stage"], int(r["step"])): float(r["train_loss"]) for r in csv.DictReader(f) if r["train_loss"]}


def compare(a: dict, b: dict) -> dict:
    """Relative training-loss differences of two runs over their common (stage, step) rows, in search order."""
    stage_order = lambda key: (key[0] == "ticket", key[0], key[1])  # noqa: E731
    keys = sorted(set(a) & set(b), key=stage_order)
    rel = [(k, abs(a[k] - b[k]) / max(abs(b[k]), 1e-12)) for k in keys]
    first = {t: next((f"{k[0]}@{k[1]}" for k, r in rel if r > t), "never") for t in (1e-5, 1e-3, 1e-1)}
    windows: dict[str, float] = {}
    for (stage, step), r in rel:
        label = stage if stage == "ticket" else f"{stage} {'<100' if step < 100 else '100+'}"
        windows[label] = max(windows.get(label, 0.0), r)
    return {"rows": len(rel), "first_above": first, "max_by_window": windows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--log-every", default="10it")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--out", default="benchmarks/out/stacked_divergence")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args)
        return
    print(f"# stacked vs unstacked CS divergence, LeNet-300-100, K={args.k}; {machine()}; "
          f"load {os.getloadavg()[0]:.2f}")
    runs = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--one", "--mode", mode, "--k", str(args.k), "--log-every", args.log_every,
               "--out", args.out] + (["--synthetic"] if args.synthetic else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{mode} failed: {proc.stderr.strip().splitlines()[-1:]}")
        runs[mode] = json.loads(lines[-1])
        print(f"  {mode}: densities {[round(r['density'], 4) for r in runs[mode]]}", flush=True)
    report = {"machine": machine(), "args": vars(args), "runs": runs, "members": []}
    for i in range(args.k):
        ref = losses(Path(runs["alone-1t"][i]["run_dir"]))
        member = {"member": i}
        for mode in ("stacked", "alone-2t"):
            member[f"{mode} vs alone-1t"] = compare(losses(Path(runs[mode][i]["run_dir"])), ref)
        report["members"].append(member)
        print(f"\nmember {i}:")
        for pair in ("stacked vs alone-1t", "alone-2t vs alone-1t"):
            c = member[pair]
            windows = ", ".join(f"{w} {v:.1e}" for w, v in c["max_by_window"].items())
            print(f"  {pair}: first above 1e-5 / 1e-3 / 1e-1: {' / '.join(c['first_above'].values())}; "
                  f"max per window: {windows}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
