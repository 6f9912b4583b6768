"""How fast can one GPU train full-width ResNet-20 on Fashion-MNIST? Sizing issue 21's point 4.

The full-width comparison (benchmarks/resnet_fashion_gpu.sh) trained at 15.7 s an epoch in each of 9
processes sharing an H200, 0.54 epochs a second in all: about 52 minutes for the whole comparison, more
than a session's device time. A ResNet-20 step at batch 128 on 28x28 images is a few hundred tiny kernels,
so the GPU waits on Python and kernel launches. This script times one training step (forward,
cross-entropy, backward, SGD with momentum and weight decay; batch already on the device, no data loading)
in ways that cut that overhead, to see which would make the comparison fit:

- ``eager``: a plain step (NCHW, float32), what the trainer does on a GPU since it stopped reading the
  loss back every step (Trainer.defer_loss_check);
- ``sync``: the same with the loss read back every step (``bool(torch.isfinite(loss))``), as the trainer
  did before (and still does on the CPU, where it costs nothing);
- ``masked``: the same with IMP's hard masks attached (half the weights pruned), as a pruned level trains;
- ``channels_last``: NHWC memory layout;
- ``bf16``: bfloat16 autocast;
- ``graph``: the whole step captured once as a CUDA graph and replayed (GPU only);
- ``stacked``: ``--stack K`` networks (seeds 0..K-1) as one stacked network (lottery.engine.stacking:
  grouped convolutions, each member its own weights and BatchNorm statistics), one step trains all K, as
  ``lottery sweep --stack`` and the stacked IMP replicates do; its epochs a second count member epochs
  (K per stacked epoch), so they compare with P processes' total;
- ``stacked_graph``: ``stacked`` captured as one CUDA graph (GPU only);
- ``--processes P``: P copies of ``eager`` at once, to see how processes share the GPU.

Each mode: ``--warmup`` steps, then ``--repeats`` timings of ``--steps`` steps, medians; milliseconds a step
and the epochs a second they mean (430 steps an epoch: 55,000 training images, batch 128).

    PYTHONPATH=src python benchmarks/resnet_gpu_step.py --device cuda [--processes 1,4,9] [--stack 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lottery.engine.stacking import fused, stack, stacked_cross_entropy
from lottery.masking import attach_hard_mask
from lottery.models import build_model
from lottery.parameters import prunable_weights

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402

STEPS_PER_EPOCH = 430
MODES = ("eager", "sync", "masked", "channels_last", "bf16", "graph", "stacked", "stacked_graph")
GPU_ONLY = ("graph", "stacked_graph")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _resnet(seed: int, width: float):
    torch.manual_seed(seed)
    return build_model("resnet20", input_shape=(1, 28, 28), num_classes=10, width=width)


def _setup(mode: str, device: str, batch: int, width: float, k: int = 1):
    if mode.startswith("stacked"):
        model = stack([_resnet(seed, width) for seed in range(k)])
    else:
        model = _resnet(0, width)
    if mode == "masked":
        g = torch.Generator().manual_seed(0)
        attach_hard_mask(model, {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in prunable_weights(model).items()})
    model.to(device).train()
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if mode == "channels_last":
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    if mode == "stacked":
        opt = fused(opt)  # what the stacked trainer steps with (one pass over the K-times larger parameters)
    return model, opt, x, y


def _loss(mode: str, model, x, y):
    """The step's loss; a stack's is the sum of its members' mean cross-entropies (each member's gradient is
    its own run's)."""
    if mode.startswith("stacked"):
        return stacked_cross_entropy(model(x), y).sum()
    return F.cross_entropy(model(x), y)


def _step_fn(mode: str, device: str, model, opt, x, y):
    def step():
        opt.zero_grad(set_to_none=True)
        if mode == "bf16":
            with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
                loss = _loss(mode, model, x, y)
        else:
            loss = _loss(mode, model, x, y)
        if mode == "sync" and not torch.isfinite(loss):
            raise FloatingPointError("the loss became inf or NaN")
        loss.backward()
        opt.step()

    if mode not in GPU_ONLY:
        return step
    # Whole-step capture: warm up on a side stream (creates the momentum buffers and picks the kernels),
    # then record one step; replaying it runs every kernel with one launch from Python.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = _loss(mode, model, x, y)
        loss.backward()
        opt.step()
    return graph.replay


def time_mode(mode: str, device: str, batch: int, width: float, steps: int, repeats: int, warmup: int,
              k: int = 1) -> dict:
    k = k if mode.startswith("stacked") else 1
    model, opt, x, y = _setup(mode, device, batch, width, k)
    step = _step_fn(mode, device, model, opt, x, y)
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        times.append((time.perf_counter() - t0) / steps)
    ms = 1000 * statistics.median(times)
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    return {"mode": mode, "networks": k, "ms_per_step": round(ms, 3),
            "epochs_per_s": round(k * 1000 / ms / STEPS_PER_EPOCH, 3),
            "repeats_ms": [round(1000 * t, 3) for t in times], "finite_after": bool(finite)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--processes", default="1", help="comma list: P copies of eager at once (1: none)")
    ap.add_argument("--stack", type=int, default=3, help="networks in the stacked modes' stack (default 3: one per seed)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--one-line", action="store_true", help=argparse.SUPPRESS)  # a child of --processes
    a = ap.parse_args(argv)
    if a.stack < 1:
        ap.error(f"--stack must be at least 1, got {a.stack}")
    torch.backends.cudnn.benchmark = True
    rows = []
    for mode in [m for m in a.modes.split(",") if m]:
        if mode not in MODES:
            ap.error(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        if mode in GPU_ONLY and not a.device.startswith("cuda"):
            continue
        rows.append(time_mode(mode, a.device, a.batch, a.width, a.steps, a.repeats, a.warmup, a.stack))
        if not a.one_line:
            print(json.dumps(rows[-1]), flush=True)
    if a.one_line:
        print(json.dumps(rows[0]))
        return 0
    shared = []
    for p in [int(v) for v in a.processes.split(",") if v and int(v) > 1]:
        cmd = [sys.executable, __file__, "--device", a.device, "--modes", "eager", "--one-line", "--batch", str(a.batch),
               "--width", str(a.width), "--steps", str(a.steps), "--repeats", str(a.repeats), "--warmup", str(a.warmup)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy()) for _ in range(p)]
        each = [json.loads(pr.communicate()[0].strip().splitlines()[-1]) for pr in procs]
        ms = statistics.median(r["ms_per_step"] for r in each)
        row = {"processes": p, "median_ms_per_step_each": round(ms, 3),
               "epochs_per_s_all": round(sum(1000 / r["ms_per_step"] / STEPS_PER_EPOCH for r in each), 3)}
        shared.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "device": a.device, "batch": a.batch, "width": a.width,
                                            "modes": rows, "processes": shared}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
