"""N:M layer speed (issue 22): one ``nn.Linear`` against the same layer with a 2:4 weight run by
``torch.sparse.to_sparse_semi_structured`` (NVIDIA's sparse tensor cores), in fp16, at square sizes
1024-8192 and batch 1024, timed interleaved with ``lottery.latency.measure_latency`` (warm-up, medians).

Why: the ``semi`` export (``lottery export --to semi``) only buys time where these kernels beat the dense
product; this measures the best case (one large layer) before any network-level claim.

    PYTHONPATH=src python benchmarks/nm_layer_speed.py [--sizes 1024,2048,4096,8192] [--batch 1024]
    PYTHONPATH=src python benchmarks/nm_layer_speed.py --dry-run    # CPU: builds and checks the 2:4 masks only

Needs a CUDA GPU of compute capability 8.0 or more; elsewhere it prints one line and exits 0. The sparse
layer's outputs are checked against the dense masked layer's (fp16 tolerance) before timing.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from lottery.methods.nm import nm_mask, satisfies_nm

SIZES = (1024, 2048, 4096, 8192)


def masked_linear(size: int, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Linear:
    """A ``size x size`` Linear whose weight keeps the 2 largest ``|w|`` of every 4 consecutive inputs."""
    torch.manual_seed(seed)
    layer = nn.Linear(size, size)
    with torch.no_grad():
        layer.weight.mul_(nm_mask({"w": layer.weight.abs()}, 2, 4)["w"])
    return layer.to(device, dtype).eval()


def check_masks(sizes) -> list[str]:
    """The dry run: every size's weight is exactly 2:4 (half its weights kept). Returns one line per size."""
    lines = []
    for size in sizes:
        w = masked_linear(size).weight
        kept = int(w.ne(0).sum())
        if not satisfies_nm({"w": w.ne(0)}, 2, 4) or kept != size * size // 2:
            raise SystemExit(f"size {size}: the weight is not exactly 2:4 ({kept} of {size * size} kept)")
        lines.append(f"size {size}: 2:4, {kept} of {size * size} weights kept")
    return lines


def gpu_reason() -> str | None:
    """Why the kernels cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if torch.cuda.get_device_capability() < (8, 0):
        return f"GPU compute capability {torch.cuda.get_device_capability()} < (8, 0)"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return "this torch has no torch.sparse.to_sparse_semi_structured"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated square layer sizes")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--dry-run", action="store_true", help="build and check the 2:4 masks on the CPU, time nothing")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.dry_run:
        print("\n".join(check_masks(sizes)))
        return 0
    reason = gpu_reason()
    if reason is not None:
        print(f"nm_layer_speed: semi-structured 2:4 kernels cannot run here ({reason}); nothing timed")
        return 0
    from lottery.latency import LatencySettings, format_latency_table, measure_latency

    for size in sizes:
        dense = masked_linear(size, dtype=torch.float16, device="cuda")
        sparse = masked_linear(size, dtype=torch.float16, device="cuda")
        sparse.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(sparse.weight.detach()), requires_grad=False)
        x = torch.randn(args.batch, size, device="cuda", dtype=torch.float16)
        with torch.inference_mode():
            diff = float((dense(x) - sparse(x)).abs().max())
            scale = float(dense(x).abs().max())
        if diff > 1e-2 * max(1.0, scale):
            raise SystemExit(f"size {size}: the semi-structured layer differs from the dense masked one by {diff:.3g}")
        # callables already on the GPU (moving a semi-structured weight again is not relied on); measure_latency
        # makes float32 inputs, so both cast to fp16 first (the same cost on each side)
        variants = {"nn.Linear (dense masked)": lambda t, m=dense: m(t.half()),
                    "2:4 semi-structured": lambda t, m=sparse: m(t.half())}
        settings = LatencySettings(batch_sizes=(args.batch,), warmup=args.warmup, repeats=args.repeats, device="cuda")
        report = measure_latency(variants, (size,), settings, baseline="nn.Linear (dense masked)")
        print(f"## {size} x {size}, batch {args.batch}, fp16 (max |dense - sparse| = {diff:.3g})")
        print(format_latency_table(report))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
