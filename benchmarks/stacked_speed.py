"""Stacked training throughput (issue 23), first measurement: K dense LeNet-300-100 (or Conv-4 narrow)
training steps as one stacked network against the same K networks stepped one after another in one
process, on random Fashion-MNIST-shaped batches of 128 (the training step only: no data loading, no
evaluation). Prints member-steps per second and the stacked/sequential ratio.

    PYTHONPATH=src python benchmarks/stacked_speed.py [--model lenet_300_100|conv4] [--steps 30] [--threads 1]

Not yet the issue's full comparison (CS searches, the best --workers setting, experiments per hour
from whole runs, RESULTS.md): a first look at what stacking buys per step.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lottery.engine.stacking import stack, stacked_cross_entropy
from lottery.models import build_model


def members(model: str, k: int):
    kw = {"width": 0.125} if model == "conv4" else {}
    out = []
    for s in range(k):
        torch.manual_seed(s)
        out.append(build_model(model, input_shape=(1, 28, 28), num_classes=10, **kw))
    return out


def timed(fn, steps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lenet_300_100")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ks", default="2,4,8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    print(f"{args.model}, {args.steps} steps, batch 128, {args.threads} thread(s)")
    print("K  sequential member-steps/s  stacked member-steps/s  ratio")
    for k in [int(v) for v in args.ks.split(",")]:
        ms = members(args.model, k)
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in ms]

        def sequential():
            for m, o in zip(ms, opts):
                o.zero_grad(set_to_none=True)
                F.cross_entropy(m(x), y).backward()
                o.step()

        st = stack(members(args.model, k))
        opt = torch.optim.SGD(st.parameters(), lr=0.1)

        def stacked():
            opt.zero_grad(set_to_none=True)
            stacked_cross_entropy(st(x), y).sum().backward()
            opt.step()

        seq = k * args.steps / timed(sequential, args.steps)
        stk = k * args.steps / timed(stacked, args.steps)
        print(f"{k:<2} {seq:>26.1f}  {stk:>22.1f}  {stk / seq:5.2f}x")


if __name__ == "__main__":
    main()
