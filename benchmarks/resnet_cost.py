"""What ResNet-20 costs on this CPU at fractional widths (issue 21): the table the width of the
`fashion_resnet20` preset was picked from.

For each width: parameters, prunable weights, FLOPs (multiply-accumulates per 1x28x28 example, lottery.cost),
and the measured seconds of one training step (forward, backward, SGD with momentum and weight decay) at
batch 128 on one torch thread, median over repeats of ``--steps`` steps each, on random Fashion-MNIST-shaped
batches (no data loading, no evaluation: `lottery train` adds about 10 % for those). Seconds per epoch
= step time x 430 (55,000 training images at batch 128), and the cost of the issue-21 benchmark follows.

    PYTHONPATH=src python benchmarks/resnet_cost.py [--widths 0.25,0.375,0.5,1] [--steps 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from lottery.cost import network_cost
from lottery.models import build_model

STEPS_PER_EPOCH = 430  # ceil(55,000 / 128)


def step_seconds(width: float, batch: int, steps: int, repeats: int) -> float:
    torch.manual_seed(0)
    model = build_model("resnet20", input_shape=(1, 28, 28), num_classes=10, width=width)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="0.25,0.375,0.5,1")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.2f}; torch {torch.__version__}, {args.threads} thread(s), "
          f"batch {args.batch}")
    print("| width | channels | params | FLOPs / example | step ms | s / epoch |")
    print("|---|---|---|---|---|---|")
    for width in (float(w) for w in args.widths.split(",")):
        model = build_model("resnet20", input_shape=(1, 28, 28), num_classes=10, width=width)
        cost = network_cost(model, None, (1, 28, 28))
        channels = [model.conv1.out_channels, model.layer2[0].conv1.out_channels, model.layer3[0].conv1.out_channels]
        sec = step_seconds(width, args.batch, args.steps, args.repeats)
        print(f"| {width:g} | {'/'.join(map(str, channels))} | {cost['params_total']:,} | {cost['flops_dense']:,} "
              f"| {sec * 1e3:.1f} | {sec * STEPS_PER_EPOCH:.1f} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
