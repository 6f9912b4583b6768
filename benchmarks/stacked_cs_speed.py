"""Stacked CS ticket searches against unstacked ones (issue 23): experiments per hour of whole short
searches (search rounds, rewind snapshot, round-end convergence figures, ticket retraining, evaluation,
run folders written), K at a time, three ways, side by side in one run:

- ``stacked``: the K searches as one stacked network in one process (``lottery sweep cs --stack K``'s
  path, lottery.pipelines.cs_stacked), with every core's threads (``--threads``);
- ``sequential``: the same K searches one after another in one process, with every core's threads;
- ``workers``: the same K searches as a local sweep with ``--workers W`` (default: one per core, 1 thread
  each: the best unstacked setting on the CPU, benchmarks/RESULTS.md), unstacked (``--stack 1``);
- ``stacked-workers``: the same local sweep with stacks of ``ceil(K / W)`` (what ``--stack auto``, the
  default, picks for LeNet; forced here, since auto does not stack convolutional networks on the CPU),
  each a worker's job, side by side, 1 thread per worker.

Each measurement runs in a fresh process (its peak RSS is its own) on a fresh output folder; no dense
reference (``--no-dense``), so only the searches are timed. Members differ in s0 (and seed with
``--seeds``), share the data order. Reported: experiments per hour, the stacked/sequential and
stacked/workers ratios, peak RSS per member and parameter + optimizer-state bytes per member.

    PYTHONPATH=src python benchmarks/stacked_cs_speed.py [--model lenet_300_100|conv4] [--ks 2,4,8]
        [--round-steps 1ep --rounds 2 --training-steps 2ep] [--out benchmarks/out/stacked_cs_speed.json]
    PYTHONPATH=src python benchmarks/stacked_cs_speed.py --model conv4 --device cuda --ks 16 \
        --modes stacked,sequential                      # the issue's GPU point

Real Fashion-MNIST (found in /usr/share/datasets/fashion-mnist or downloaded); ``--synthetic`` for a
quick look without it. Numbers from a loaded machine are indicative only: write the load average
(printed) beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402


def jobs(args, k: int):
    from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
    from lottery.methods.cs import CSHparams
    from lottery.pipelines.cs import CSJob

    if args.synthetic:
        data = DataHparams(dataset="synthetic", synthetic_shape=(1, 28, 28), synthetic_train_size=6400,
                           synthetic_test_size=1000, val_size=1000)
    else:
        data = DataHparams(dataset="fashion-mnist", val_size=5000)
    model = ModelHparams(model=args.model, width=0.125 if args.model == "conv4" else None)
    training = TrainingHparams(training_steps=args.training_steps, batch_size=128, lr=0.1 if args.model != "conv4" else 0.05,
                               momentum=0.9, weight_decay=1e-4, schedule="constant", milestones=(),
                               eval_every=args.round_steps, data_order_seed=0)
    cs = CSHparams(rounds=args.rounds, round_steps=args.round_steps, rewind=args.rewind)
    s0s = [0.1 - 0.1 * i / max(1, k - 1) for i in range(k)]  # 0.1 .. 0 (denser .. sparser)
    return [CSJob(data, model, training, cs.replace(s0=round(s0, 4)), seed=(i if args.seeds else 0),
                  dense_reference=False) for i, s0 in enumerate(s0s)]


def param_bytes_per_member(args) -> int:
    """Weights, mask logits, SGD momentum (weights), Adam's two moments (logits): one member's training state."""
    from lottery import masking
    from lottery.experiment import RunOptions, build_model, load_data, prune_ignore

    job = jobs(args, 1)[0]
    model = build_model(job.model, load_data(job.data, RunOptions(progress=False, log=lambda s: None)), 0)
    weights = sum(p.numel() for p in model.parameters())
    logits = sum(p.numel() for n, p in model.named_parameters()
                 if n in masking.prunable_weights(model, ignore=prune_ignore(job.model)))
    return 4 * (2 * weights + 3 * logits)


def one(args) -> None:
    """One measurement, in this (fresh) process: print a JSON line."""
    import torch

    from lottery.experiment import RunOptions

    k = args.k
    out = Path(tempfile.mkdtemp(prefix=f"stacked_cs_{args.mode}_{k}_"))
    options = RunOptions(out=out, progress=False, log=lambda line: None, device=args.device)
    js = jobs(args, k)
    cores = args.threads or os.cpu_count() or 1
    t0 = time.perf_counter()
    if args.mode == "stacked":
        torch.set_num_threads(cores)
        from lottery.pipelines.cs_stacked import run_cs_stacked

        results = run_cs_stacked(js, options, raise_errors=False)
    elif args.mode == "sequential":
        torch.set_num_threads(cores)
        from lottery.pipelines.cs import run_cs

        results = []
        for j in js:
            try:
                results.append(run_cs(j, options))
            except Exception as e:  # noqa: BLE001
                results.append(e)
    elif args.mode in ("workers", "stacked-workers"):
        from lottery.sweep import run_sweep

        workers = args.workers or os.cpu_count() or 1
        sweep = run_sweep(js, options, workers=workers, threads_per_worker=1, backend="local",
                          stack=-(-len(js) // workers) if args.mode == "stacked-workers" else 1)
        results = [o.results if o.ok else RuntimeError(o.error) for o in sweep.outcomes]
    else:
        raise SystemExit(f"unknown mode {args.mode!r}")
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    import shutil

    shutil.rmtree(out, ignore_errors=True)  # the run folders (~6 MB per LeNet search) are not the result
    ok = [r for r in results if isinstance(r, dict)]
    print(json.dumps({"mode": args.mode, "k": k, "seconds": seconds, "ok": len(ok), "peak_rss": rss,
                      "peak_rss_worker": rss_children,
                      "stacked": sum(1 for r in ok if "stack" in r),
                      "densities": [round(r["density"], 4) for r in ok],
                      "errors": [str(r)[:200] for r in results if not isinstance(r, dict)]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lenet_300_100", choices=["lenet_300_100", "conv4"])
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--modes", default="stacked,sequential,workers,stacked-workers")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--round-steps", default="1ep")
    ap.add_argument("--training-steps", default="2ep", help="the recipe's length: the ticket retrains from the rewind point to it")
    ap.add_argument("--rewind", default="50it")
    ap.add_argument("--workers", type=int, default=None, help="workers of the unstacked sweep (default: one per core)")
    ap.add_argument("--seeds", action="store_true", help="members also differ in their initialisation seed")
    ap.add_argument("--synthetic", action="store_true", help="synthetic 28x28 data instead of Fashion-MNIST")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the stacked and sequential processes (default: one per core; on a loaded "
                         "machine a 2-thread process stalls on every busy core, so compare with 1 there)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (on a GPU compare --modes stacked,sequential)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of measurements: every (K, mode) once per round, rounds one after another, so the "
                         "modes interleave; the table gives medians over rounds (default 1)")
    ap.add_argument("--out", default=None, help="also write the measurements to this JSON file")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args)
        return
    print(f"# Stacked CS searches, {args.model}: {args.rounds} rounds x {args.round_steps}, ticket to {args.training_steps} "
          f"(rewind {args.rewind}), batch 128, {'synthetic data' if args.synthetic else 'Fashion-MNIST'}")
    print(f"{machine()}; load average at start {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    per_member_state = param_bytes_per_member(args)
    rows = []
    for rep in range(args.repeats):
        for k in [int(v) for v in args.ks.split(",")]:
            for mode in args.modes.split(","):
                cmd = [sys.executable, __file__, "--one", "--mode", mode, "--k", str(k), "--model", args.model,
                       "--rounds", str(args.rounds), "--round-steps", args.round_steps, "--training-steps",
                       args.training_steps, "--rewind", args.rewind]
                cmd += ["--seeds"] if args.seeds else []
                cmd += ["--synthetic"] if args.synthetic else []
                cmd += ["--workers", str(args.workers)] if args.workers else []
                cmd += ["--device", args.device]
                cmd += ["--threads", str(args.threads)] if args.threads else []
                proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
                lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
                if proc.returncode != 0 or not lines:
                    print(f"K={k} {mode}: failed: {proc.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(lines[-1])
                r["load"] = os.getloadavg()[0]
                r["repeat"] = rep
                rows.append(r)
                print(f"  round {rep + 1}/{args.repeats} K={k} {mode}: {r['seconds']:.1f} s, {r['ok']}/{k} ok "
                      f"({r['stacked']} stacked), load {r['load']:.2f}", flush=True)
    measured = rows
    rows = []  # per (K, mode): the median run over the rounds (its seconds; the spread beside it)
    for key in dict.fromkeys((r["k"], r["mode"]) for r in measured):
        runs = sorted((r for r in measured if (r["k"], r["mode"]) == key), key=lambda r: r["seconds"])
        med = dict(runs[len(runs) // 2])
        med["seconds"] = statistics.median(r["seconds"] for r in runs)
        med["all_seconds"] = [r["seconds"] for r in runs]
        rows.append(med)
    print()
    print("| K | mode | seconds (median) | runs (s) | experiments/hour | vs sequential | vs workers | peak RSS per member (MB) | load |")
    print("|---|------|---------|------|------------------|---------------|------------|--------------------------|------|")
    by = {(r["k"], r["mode"]): r for r in rows}
    for r in rows:
        eph = 3600 * r["k"] / r["seconds"]
        seq, wrk = by.get((r["k"], "sequential")), by.get((r["k"], "workers"))
        vs = lambda other: f"{other['seconds'] / r['seconds']:.2f}x" if other else "-"  # noqa: E731
        rss = max(r["peak_rss"], r["peak_rss_worker"] * (args.workers or os.cpu_count() or 1)
                  if r["mode"] in ("workers", "stacked-workers") else 0)
        runs = " / ".join(f"{v:.1f}" for v in r["all_seconds"])
        print(f"| {r['k']} | {r['mode']} | {r['seconds']:.1f} | {runs} | {eph:.0f} | {vs(seq)} | {vs(wrk)} | "
              f"{rss / r['k'] / 2**20:.0f} | {r['load']:.2f} |")
    print(f"\nparameters + optimizer state per member: {per_member_state / 2**20:.2f} MB (the same stacked or not)")
    print("peak RSS per member: the process's peak / K (workers: each worker's peak x workers / K; it includes "
          "the data set and PyTorch itself, which stacking shares)")
    errors = [e for r in rows for e in r["errors"]]
    if errors:
        print(f"failed members: {errors[:3]}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": machine(), "args": vars(args), "rows": rows, "runs": measured,
                                              "state_bytes_per_member": per_member_state}, indent=1))


if __name__ == "__main__":
    main()
