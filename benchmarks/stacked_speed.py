"""Stacked training throughput (issue 23), first measurement: K dense LeNet-300-100 (or Conv-4 narrow)
training steps as one stacked network against the same K networks stepped one after another in one
process, on random Fashion-MNIST-shaped batches of 128 (the training step only: no data loading, no
evaluation). Prints member-steps per second and the stacked/sequential ratio.

    PYTHONPATH=src python benchmarks/stacked_speed.py [--model lenet_300_100|conv4] [--steps 30] [--threads 1]
        [--method dense|cs]

``--method cs``: the CS search step (soft masks, penalty, SGD weights and Adam logits; the stack's
optimizers fused, as lottery.engine.stacking.StackedTrainer builds them; ``--fused-sequential`` gives the
sequential members fused optimizers too). Whole runs, the --workers setting and experiments per hour:
benchmarks/stacked_cs_speed.py.
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


def cs_steps(args, k: int, x, y):
    """One CS search step of K members one after another, and of the K members stacked."""
    from lottery import masking
    from lottery.engine.stacking import fused
    from lottery.hparams import TrainingHparams
    from lottery.methods.cs import CSHparams, make_search_optimizers, mask_penalty

    hp, cs = TrainingHparams(lr=0.1, momentum=0.9, weight_decay=1e-4), CSHparams()
    s0s = [0.1 - 0.1 * i / max(1, k - 1) for i in range(k)]
    ms = members(args.model, k)
    names = list(masking.prunable_weights(ms[0]))
    opts = []
    for m, s0 in zip(ms, s0s):
        masking.attach_soft_mask(m, names, s0=s0)
        o = make_search_optimizers(m, hp, cs, 100)
        opts.append([fused(v) for v in o] if args.fused_sequential else o)

    def sequential():
        for m, o in zip(ms, opts):
            masking.set_temperature(m, 2.0)
            loss = F.cross_entropy(m(x), y) + mask_penalty(m, 1e-8, reuse_forward=True)
            for v in o:
                v.zero_grad(set_to_none=True)
            loss.backward()
            for v in o:
                v.step()

    from lottery.engine.stacking import _member_slice, _stack_tensors

    st = stack(members(args.model, k))
    shapes = {n: _member_slice(p, st.layout[n], 0, k).shape for n, p in st.body.named_parameters()}
    masking.attach_soft_mask(st.body, {n: _stack_tensors([torch.full(shapes[n], s0) for s0 in s0s], st.layout[n])
                                       for n in names})
    masking.set_member_s0(st.body, s0s)
    sopts = [fused(v) for v in make_search_optimizers(st, hp, cs, 100)]
    lams = torch.full((k,), 1e-8)

    def stacked():
        masking.set_temperature(st, 2.0)
        out = st(x)
        values = masking.soft_mask_values(st, reuse_forward=True)
        loss = stacked_cross_entropy(out, y).sum() + (lams * sum(v.reshape(k, -1).sum(1) for v in values.values())).sum()
        for v in sopts:
            v.zero_grad(set_to_none=True)
        loss.backward()
        for v in sopts:
            v.step()

    return sequential, stacked


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
    ap.add_argument("--method", default="dense", choices=["dense", "cs"])
    ap.add_argument("--fused-sequential", action="store_true", help="cs: fused optimizers for the sequential members too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    import os

    print(f"{args.model} {args.method}, {args.steps} steps, batch 128, {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.2f}")
    print("K  sequential member-steps/s  stacked member-steps/s  ratio")
    for k in [int(v) for v in args.ks.split(",")]:
        ms = members(args.model, k)
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in ms]

        def sequential():
            for m, o in zip(ms, opts):
                o.zero_grad(set_to_none=True)
                F.cross_entropy(m(x), y).backward()
                o.step()

        if args.method == "cs":
            sequential, stacked = cs_steps(args, k, x, y)
        else:
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
