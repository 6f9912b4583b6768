"""Training-step time in the default (NCHW) memory layout against ``channels_last`` (NHWC) on the CPU:
why lottery's trainer runs convolutional networks in ``channels_last`` there (lottery.engine.trainer,
``use_channels_last``).

For each network: one training step (forward, cross-entropy, backward, SGD with momentum and weight decay)
on a random Fashion-MNIST-shaped batch, both layouts built from the same seed and timed interleaved
(``--repeats`` rounds of ``--steps`` steps each, layouts alternating), medians, 1 torch thread.

    PYTHONPATH=src python benchmarks/memory_format_speed.py [--batch 128] [--steps 5] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lottery.models import build_model

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402

NETWORKS = (("resnet20", 0.25), ("resnet20", 0.5), ("conv4", 0.125), ("conv4", None))


def stepper(name: str, width: float | None, channels_last: bool, batch: int):
    torch.manual_seed(0)
    kwargs = {"width": width} if width is not None else {}
    model = build_model(name, input_shape=(1, 28, 28), num_classes=10, **kwargs)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# {machine()}; load average {os.getloadavg()[0]:.2f}; batch {args.batch}, 1 thread")
    print("| network | NCHW ms / step | channels_last ms / step | speed-up |")
    print("|---|---|---|---|")
    for name, width in NETWORKS:
        steps = {cl: stepper(name, width, cl, args.batch) for cl in (False, True)}
        for step in steps.values():
            for _ in range(2):
                step()
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for cl, step in steps.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[cl].append((time.perf_counter() - t0) / args.steps)
        a, b = statistics.median(times[False]), statistics.median(times[True])
        label = f"{name} width {width:g}" if width is not None else f"{name} full width"
        print(f"| {label} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.2f}x |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
