"""2:4 Linear layers on sparse tensor cores against dense ``nn.Linear`` (issue 22, part 3): does a 2:4 N:M
ticket's layer run faster than the dense one, for layers large enough to matter?

For each size ``n`` of ``--sizes``: an ``n x n`` ``nn.Linear`` (with bias) in ``--dtype`` on the GPU whose
weights are pruned to 2:4 by magnitude (``lottery.methods.nm.nm_mask``); the dense layer keeps them in a
dense matrix, the sparse one has them converted by ``lottery.export.semi_structured`` (the function that
``load_export`` and ``lottery bench-latency`` use; ``torch.sparse.to_sparse_semi_structured``, cuSPARSELt or
CUTLASS). Both get the same ``--batch x n`` inputs; their outputs are compared first (the converted layer
is checked against the dense one inside ``semi_structured`` too). Timings come from
``lottery.latency.measure_latency``: warm-up, ``--repeats`` interleaved timings in rotating order, CUDA
synchronised around each call, medians with the 25th-75th percentiles. The speed-up is
``median(dense) / median(2:4)`` at the same size, batch and dtype.

    PYTHONPATH=src python benchmarks/nm_layer_speed.py [--sizes 1024,2048,4096,8192] [--batch 1024] \\
        [--dtype float16] [--repeats 50] [--json nm_layer_speed.json]
    PYTHONPATH=src python benchmarks/nm_layer_speed.py --dry-run    # any machine: masks and checks, no timing

Exit status: 0 when measured (or when the dry run's checks pass); 2, after one line saying why, on a
machine without a CUDA GPU of compute capability 8.0 or more that the 2:4 kernels run on (nothing is
timed: there is nothing to compare); 1 when a check fails.

PyTorch's tutorial on 2:4 sparsity was measured on an A100 and warns that newer GPUs may show smaller
speed-ups; report the GPU, torch and cuSPARSELt version printed here with any number.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from lottery.io import write_json
from lottery.export.semi import semi_shape_supported, semi_structured, semi_structured_supported, two_four
from lottery.latency import DTYPES, LatencySettings, format_latency_table, measure_latency
from lottery.methods.nm import nm_mask

DRY_SIZES = "64,128"


def pruned_linear(n: int, seed: int) -> nn.Linear:
    """An ``n x n`` Linear layer (float32, CPU) whose weights are pruned to 2:4 by magnitude."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n, n)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, n, generator=g) / n ** 0.5)
        layer.bias.copy_(torch.randn(n, generator=g) * 0.1)
        mask = nm_mask({"w": layer.weight.abs()}, 2, 4)["w"]
        layer.weight.mul_(mask)
    return layer


def dry_run(sizes: Sequence[int], dtype: torch.dtype, seed: int) -> int:
    """What can be checked without a GPU: the masks are 2:4 (exactly 2 of every 4 inputs kept), which sizes
    the kernels would take in ``dtype``, and that the fallback leaves a layer computing what it did."""
    failed = False
    for n in sizes:
        layer = pruned_linear(n, seed)
        kept = int(layer.weight.ne(0).sum())
        shape_ok, why = semi_shape_supported((n, n), dtype)
        x = torch.randn(8, n, generator=torch.Generator().manual_seed(seed + 1))
        with torch.no_grad():
            before = layer(x)
            lines: list[str] = []
            net = nn.Sequential(copy.deepcopy(layer))
            _, converted = semi_structured(net, log=lines.append)
            same = torch.equal(net(x), before) if not converted else True
        ok = two_four(layer.weight) and kept == n * n // 2 and len(lines) == 1 and same
        failed |= not ok
        print(f"{n}x{n}: 2:4 {'yes' if two_four(layer.weight) else 'NO'}, kept {kept}/{n * n}, "
              f"{_name(dtype)} shape {'taken' if shape_ok else 'refused: ' + why}; here: {lines[0] if lines else '-'}"
              f"{'' if ok else '  CHECK FAILED'}")
    print("dry run: " + ("a check failed" if failed else "every check passed (no timing on a dry run)"))
    return 1 if failed else 0


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def measure(sizes: Sequence[int], batch: int, dtype: torch.dtype, warmup: int, repeats: int, seed: int) -> dict:
    """Time dense vs 2:4 for every size; returns a JSON-ready report (one latency report per size)."""
    device = torch.device("cuda")
    results = []
    for n in sizes:
        dense = pruned_linear(n, seed).to(device=device, dtype=dtype).eval()
        sparse = copy.deepcopy(dense)
        lines: list[str] = []
        _, converted = semi_structured(nn.Sequential(sparse), log=lines.append)
        if not converted:
            print(f"{n}x{n}: not converted, not timed ({lines[0]})")
            results.append({"size": n, "converted": False, "note": lines[0]})
            continue
        x = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)
        with torch.no_grad():
            want, got = dense(x).float(), sparse(x).float()
        diff = float((want - got).abs().max())
        settings = LatencySettings(batch_sizes=(batch,), warmup=warmup, repeats=repeats, device="cuda",
                                   dtype=_name(dtype), seed=seed)
        report = measure_latency({"dense": dense, "2:4": sparse}, (n,), settings, baseline="dense")
        print(f"\n{n}x{n} Linear, batch {batch}: max |dense - 2:4| = {diff:.3g}; {lines[0]}")
        print(format_latency_table(report))
        med = {r["variant"]: r for r in report["rows"]}
        results.append({"size": n, "converted": True, "max_abs_diff": diff, "note": lines[0],
                        "dense_ms": med["dense"]["median_ms"], "semi_ms": med["2:4"]["median_ms"],
                        "dense_p25_p75_ms": [med["dense"]["p25_ms"], med["dense"]["p75_ms"]],
                        "semi_p25_p75_ms": [med["2:4"]["p25_ms"], med["2:4"]["p75_ms"]],
                        "speedup": report["speedup"][str(batch)]["2:4"], "timings": med["dense"]["timings"]})
    return {"gpu": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device)),
            "torch": torch.__version__, "cusparselt": _cusparselt_version(), "dtype": _name(dtype), "batch": batch,
            "warmup": warmup, "repeats": repeats, "results": results}


def _cusparselt_version() -> int | None:
    lt = getattr(torch.backends, "cusparselt", None)
    return lt.version() if lt is not None and lt.is_available() else None


def summary(report: dict) -> str:
    """The side-by-side table: one row per size."""
    head = (f"{report['gpu']} (compute capability {report['capability'][0]}.{report['capability'][1]}), torch "
            f"{report['torch']}, cuSPARSELt {report['cusparselt']}, {report['dtype']}, batch {report['batch']}, "
            f"{report['repeats']} interleaved timings, medians (p25-p75)")
    lines = [head, "", "| n x n | dense ms | 2:4 ms | speed-up | max abs diff |", "|---|---|---|---|---|"]
    for r in report["results"]:
        if not r["converted"]:
            lines.append(f"| {r['size']} | - | - | not converted | - |")
            continue
        d, s = r["dense_p25_p75_ms"], r["semi_p25_p75_ms"]
        lines.append(f"| {r['size']} | {r['dense_ms']:.3f} ({d[0]:.3f}-{d[1]:.3f}) | {r['semi_ms']:.3f} "
                     f"({s[0]:.3f}-{s[1]:.3f}) | {r['speedup']:.2f}x | {r['max_abs_diff']:.2g} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=None, help="comma-separated n of the n x n layers (default: 1024,2048,4096,8192; "
                                                  f"dry run: {DRY_SIZES})")
    ap.add_argument("--batch", type=int, default=1024, help="rows of the input (default: 1024)")
    ap.add_argument("--dtype", choices=DTYPES, default="float16",
                    help="default float16 (cuSPARSELt has no float32 kernels)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    ap.add_argument("--dry-run", action="store_true", help="no GPU needed: build the masks and check them, no timing")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    sizes = [int(v) for v in (args.sizes or (DRY_SIZES if args.dry_run else "1024,2048,4096,8192")).split(",") if v]
    if args.dry_run:
        return dry_run(sizes, dtype, args.seed)
    ok, why = semi_structured_supported("cuda", dtype)
    if not ok:
        print(f"nm_layer_speed: nothing timed: {why} (--dry-run checks the masks on any machine)")
        return 2
    report = measure(sizes, args.batch, dtype, args.warmup, args.repeats, args.seed)
    print()
    print(summary(report))
    if args.json is not None:
        write_json(args.json, report)
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
