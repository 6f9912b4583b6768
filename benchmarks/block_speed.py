"""Block export speed (issue 22, part 1): the packed block layers (one gather, one bmm or grouped conv per
bucket of similar blocks, one gather of the output rows) against the old per-block loop, the masked network
and the dense network, side by side with ``lottery.latency.measure_latency`` (interleaved timings, medians).

The block layers run three ways: ``loop`` (the old path), ``packed`` and ``auto`` (each layer times both on
its first input of each shape and keeps the faster; the default of an export).

The model is Conv-4 at full width on Fashion-MNIST-shaped inputs (1x28x28, as in RESULTS.md's structured
tickets) with random weights; the mask is a Regroup-like block mask built here, no training: every masked
layer's rows are cut into blocks of ``--rows`` consecutive rows (``--fc-rows`` for Linear layers) and each
block keeps a random ``--density`` of the columns, im2col elements (``element``, Regroup's default) or
whole input channels (``channel``, ``--columns channel``). ``--regroup`` instead runs Regroup itself
(KaHyPar) on a random unstructured mask of that density. The output layer is not masked (Conv-4's default).

    PYTHONPATH=src python benchmarks/block_speed.py [--density 0.37] [--units element,channel] [--threads 1]
    PYTHONPATH=src python benchmarks/block_speed.py --source IMP_RUN --units channel --regroup-rows 32,32 \
        --dense-channels-last --no-loop      # Regroup of a trained ticket's mask, with its trained weights

Outputs of every export equal the masked network's (export_model's check, and checked again here on one
batch). Timings on a shared, loaded machine are indicative only.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

from lottery import masking
from lottery.export import BlockConv2d, BlockLinear, export_model
from lottery.latency import LatencySettings, format_latency_table, measure_latency
from lottery.masks import Mask
from lottery.models import build_model

SHAPE = (1, 28, 28)


def block_mask(model, density: float, unit: str, rows: int, fc_rows: int, seed: int) -> Mask:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        if not name.endswith(".weight") or p.dim() < 2 or name == "fc.weight":
            continue
        m = torch.zeros(p.shape[0], p[0].numel(), dtype=torch.bool)
        per = 1 if p.dim() == 2 or unit == "element" else p[0, 0].numel()
        units = m.shape[1] // per
        step = rows if p.dim() == 4 else fc_rows
        for r0 in range(0, p.shape[0], step):
            keep = torch.randperm(units, generator=g)[: max(1, round(density * units))]
            cols = (keep.unsqueeze(1) * per + torch.arange(per)).reshape(-1)
            m[r0:r0 + step, cols] = True
        out[name] = m.reshape(p.shape)
    return Mask(out)


def regroup_mask(model, density: float, unit: str, seed: int, rows: tuple[int, int] = (16, 32),
                 source: Mask | None = None) -> Mask:
    """Regroup (KaHyPar) of ``source`` (a trained ticket's mask) or of a random mask of ``density``."""
    from lottery.methods.structured import StructuredHparams, regroup

    if source is None:
        g = torch.Generator().manual_seed(seed)
        source = Mask({n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters()
                       if n.endswith(".weight") and p.dim() >= 2 and n != "fc.weight"})
    return regroup(source, None, StructuredHparams(method="regroup", columns=unit, seed=seed, min_rows=rows[0],
                                                   max_rows=rows[1]))


def with_path(module, path: str):
    """A copy of an export whose block layers run ``path``: loop (the old per-block loop), packed or auto."""
    out = copy.deepcopy(module)
    for m in out.modules():
        if isinstance(m, (BlockConv2d, BlockLinear)):
            m.path = path
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--density", type=float, default=0.37)
    ap.add_argument("--units", default="element,channel")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--fc-rows", type=int, default=32)
    ap.add_argument("--regroup", action="store_true", help="run Regroup (KaHyPar) on a random mask instead")
    ap.add_argument("--source", default=None,
                    help="an IMP run folder (Conv-4, Fashion-MNIST): Regroup its last level's trained mask and time "
                         "the export with its trained weights (implies --regroup)")
    ap.add_argument("--regroup-rows", default="16,32", help="Regroup's MIN,MAX rows of a block (32,32: faster groups)")
    ap.add_argument("--dense-channels-last", action="store_true",
                    help="also time the dense network in channels_last memory (the layout the channel blocks run in)")
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-loop", action="store_true", help="leave out the old per-block loop (slow at batch 64)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rows = tuple(int(v) for v in args.regroup_rows.split(","))
    source = None
    if args.source:
        from lottery.pipelines.structured import load_run_network

        model, source, _ = load_run_network(args.source)
        model.eval()
        args.regroup = True
    else:
        model = build_model("conv4", input_shape=SHAPE, num_classes=10).eval()
    masked = copy.deepcopy(model)  # hard-masked with the first unit's mask
    variants = {"dense": model}
    exports = {}
    for unit in [u.strip() for u in args.units.split(",") if u.strip()]:
        mask = (regroup_mask(model, args.density, unit, args.seed, rows, source) if args.regroup
                else block_mask(model, args.density, unit, args.rows, args.fc_rows, args.seed))
        exp = export_model(model, mask, "blocks", input_shape=SHAPE)
        flops = exp.description["flops"]
        padded = sum(m.padded_weights_per_position() for m in exp.module.modules() if isinstance(m, (BlockConv2d, BlockLinear)))
        plain = sum(m.weights_per_position() for m in exp.module.modules() if isinstance(m, (BlockConv2d, BlockLinear)))
        print(f"{unit} blocks: density {mask.density():.4f}, theoretical speed-up {flops['theoretical_speedup']:.2f}x, "
              f"packed padding {padded / plain:.3f}x the blocks' weights, check max diff {exp.description['check']['max_abs_diff']:.2e}")
        if "masked" not in variants:  # the hard-masked network of the first unit's mask
            masking.attach_hard_mask(masked, mask)
            variants["masked"] = masked.eval()
        x = torch.randn(4, *SHAPE)
        with torch.no_grad():
            ref = copy.deepcopy(model)
            for k, m in mask.items():
                dict(ref.named_parameters())[k].data.mul_(m)
            for name, mod in ((p, with_path(exp.module, p)) for p in ("loop", "packed", "auto")):
                diff = float((ref.eval()(x) - mod(x)).abs().max())
                assert diff < 1e-4, (name, diff)
        exports[unit] = exp.module
    if args.dense_channels_last:
        variants["dense channels_last"] = copy.deepcopy(model).to(memory_format=torch.channels_last)
    for unit, module in exports.items():
        for path in ("loop", "packed", "auto"):
            if path != "loop" or not args.no_loop:
                variants[f"blocks-{unit} ({path})"] = with_path(module, path)
    settings = LatencySettings(batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")), warmup=args.warmup,
                               repeats=args.repeats, threads=args.threads)
    print(f"load average before: {os.getloadavg()}")
    report = measure_latency(variants, SHAPE, settings, baseline="dense")
    print(format_latency_table(report))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
