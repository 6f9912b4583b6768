"""Commands for structured tickets and what they buy: ``structure``, ``export`` and ``bench-latency``.

* ``lottery structure refill|refill+|regroup RUN_DIR [--level L] [--after cs|imp]``: a structured ticket
  from a CS ticket search or an IMP level, retrained from the rewind point (its own run folder);
  ``--every-level --levels N``: the structure step inside the IMP loop, from an IMP run's dense level 0.
* ``lottery export RUN_DIR --to dense|blocks|csr|semi``: the run's trained ticket as a smaller dense
  network, a network of dense blocks, one with CSR Linear layers, or (``semi``, for 2:4 N:M tickets) the
  masked network whose 2:4 Linear layers run on sparse tensor cores once loaded on a GPU that has them
  (``model.safetensors`` + ``model.json``, which records the data set's normalisation), plus portable
  copies that run without lottery (``--portable``: ``model.pt`` TorchScript by default, ``model.onnx``
  with the ``onnx`` extra; always dense weights).
* ``lottery bench-latency RUN_DIR_OR_EXPORT``: dense vs masked vs exported, side by side.

:func:`register` adds them to the top-level parsers that :mod:`lottery.cli` builds.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable
from lottery.cli.common import (
    OneLineErrorParser, add_hparams_flags, hparams_from_args, run_option_flags, run_options,
)

AUTO = "auto"


def register(top_sub, common_flags: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Add ``structure``, ``export`` and ``bench-latency`` to ``top_sub`` (the sub-parsers of ``lottery``).

    ``common_flags`` is accepted for symmetry with the other command modules; these commands take their
    recipe from the run folder they are given, so they only add where/how-to-run flags.
    """
    from lottery.methods.structured import StructuredHparams

    structure = top_sub.add_parser(
        "structure", help="structured tickets (refill, refill+, regroup, nm) from a CS or IMP run",
        description="Turn the mask of a CS ticket search or of an IMP level into a channel-wise (refill, "
                    "refill+), group-wise (regroup) or N:M (nm) mask and retrain it from the run's rewind point "
                    "(Chen et al. 2022, SLT). The result is a run folder of its own with results.json.")
    sub = structure.add_subparsers(dest="structure_method", metavar="METHOD", parser_class=OneLineErrorParser)
    sub.required = True
    for method, short in (("refill", "keep whole channels: the layer's budget, by L1 norm of trained weights"),
                          ("refill+", "refill plus a fill-back fraction of the dropped channels"),
                          ("regroup", "hypergraph-partition rows into dense blocks"),
                          ("nm", "N:M sparsity (--nm 2:4): at most N kept in every M consecutive input weights, "
                                 "by |w| (after IMP) or by the mask logits (after CS)")):
        p = sub.add_parser(method, help=short, description=short)
        p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a CS ticket search or an IMP run folder")
        p.add_argument("--level", type=int, default=None, help="IMP level to structure (default: the last finished)")
        p.add_argument("--after", choices=("cs", "imp"), default=None,
                       help="the kind of RUN_DIR (default: read from its hparams.json; checked when given)")
        p.add_argument("--every-level", action="store_true",
                       help="IMP runs: structure inside the IMP loop at every level, from the run's dense level 0")
        p.add_argument("--levels", type=int, default=3, help="with --every-level: number of levels (default: 3)")
        add_hparams_flags(p, StructuredHparams, "structured ticket", skip=("method",))
        run_option_flags(p)
        p.set_defaults(func=lambda a, m=method: cmd_structure(a, m))

    p = top_sub.add_parser(
        "export", help="export a ticket as a smaller dense network, dense blocks, CSR or 2:4 semi-structured layers",
        description="Export the trained ticket of RUN_DIR: 'dense' removes the channels whose output is "
                    "always zero (BatchNorm and the next layer's inputs shrink with them; residual stages "
                    "shrink as a whole), 'blocks' runs each dense block of a masked layer as one matrix "
                    "product, 'csr' stores masked Linear layers as torch.sparse_csr matrices, 'semi' (2:4 N:M "
                    "tickets: lottery structure nm RUN --nm 2:4) keeps the masked network whole and records its 2:4 "
                    "Linear layers, which load_export and bench-latency run with torch.sparse.to_sparse_semi_structured "
                    "on a CUDA GPU of compute capability >= 8.0 in float16/bfloat16 (elsewhere: the dense masked "
                    "layers, said in one line; conv layers always; its portable copies hold the dense masked "
                    "weights). Writes "
                    "model.safetensors and model.json (shapes and the data set's normalisation; no pickled "
                    "modules) and portable copies (model.pt for torch.jit.load, model.onnx for onnxruntime) "
                    "that take raw pixels in [0, 1] and need no lottery; every file is checked to compute "
                    "what the masked network computes.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a structure, CS, IMP or dense run folder")
    p.add_argument("--to", choices=("dense", "blocks", "csr", "semi"), default="dense",
                   help="export kind (default: dense); semi: 2:4 Linear layers for sparse tensor cores (N:M tickets)")
    p.add_argument("--level", type=int, default=None, help="IMP runs: the level (default: the last finished)")
    p.add_argument("--out", type=Path, default=None, help="export folder (default: RUN_DIR[/level_L]/export-<kind>)")
    p.add_argument("--check-inputs", type=int, default=16, help="random inputs of the equality check (default: 16)")
    p.add_argument("--portable", default="torchscript",
                   help="comma-separated portable copies to write and check: torchscript (model.pt), onnx "
                        "(model.onnx; needs pip install 'lottery[onnx]'), or none (default: torchscript)")
    p.add_argument("--no-preprocessing", action="store_true",
                   help="leave the data set's normalisation out: the export then takes normalised inputs, as "
                        "the network did in training (default: it takes raw pixels in [0, 1])")
    p.set_defaults(func=cmd_export)

    p = top_sub.add_parser(
        "bench-latency", help="inference latency: dense vs masked vs exported, side by side",
        description="Time the dense network, the masked ticket and its exports in one interleaved "
                    "measurement (warm-up, many repeats, medians, fixed thread count) at each batch size, "
                    "on the CPU and, when there is one, the GPU; print the table and the speed-ups.")
    p.add_argument("path", type=Path, metavar="RUN_DIR_OR_EXPORT", help="a run folder, or an export folder (model.json)")
    p.add_argument("--level", type=int, default=None, help="IMP runs: the level (default: the last finished)")
    p.add_argument("--to", default=AUTO,
                   help="comma-separated exports to time: dense, blocks, csr, semi (default: dense for refill runs, "
                        "dense,blocks for regroup, dense,semi for nm, dense,csr otherwise); semi runs its 2:4 Linear "
                        "layers on sparse tensor cores where the device allows it (a CUDA GPU of compute capability "
                        ">= 8.0, --dtype float16 or bfloat16), else as dense masked layers, marked * in the table")
    p.add_argument("--batch-sizes", default="1,64", help="comma-separated batch sizes (default: 1,64)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads during the timing (default: 1)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls per variant first (default: 10)")
    p.add_argument("--repeats", type=int, default=50, help="timed calls per variant (default: 50)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto: the CPU, and the GPU when there is one (default)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="every variant's dtype (default: float32); the 2:4 kernels of --to semi need float16 or bfloat16")
    p.add_argument("--json", type=Path, default=None, help="also write the report to this JSON file")
    p.set_defaults(func=cmd_bench_latency)


def cmd_structure(args: argparse.Namespace, method: str) -> int:
    from lottery.errors import ConfigError
    from lottery.methods.structured import StructuredHparams
    from lottery.pipelines.structured import StructuredIMPJob, StructureJob, run_structure, run_structured_imp
    from lottery.report import print_table

    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a folder (expected a CS or IMP run folder)")
    if args.out is None:
        args.out = run_dir.resolve().parent
    hp = hparams_from_args(args, StructuredHparams, StructuredHparams(method=method))
    options = run_options(args)
    if args.every_level:
        if args.after == "cs" or args.level is not None:
            raise ConfigError("--every-level runs the IMP loop from level 0: it takes neither --after cs nor --level")
        summary = run_structured_imp(StructuredIMPJob(run_dir, hp, levels=args.levels), options)
        dense = {"method": "dense", "level": 0, "density": 1.0, "test_accuracy": summary["dense_test_accuracy"]}
        print_table([dense, *summary["levels"]], title=f"IMP with {method} at every level")
        print(f"run folder: {summary['run_dir']}")
        return 0
    results = run_structure(StructureJob(run_dir, hp, after=args.after, level=args.level), options)
    rows = []
    if results.get("dense_test_accuracy") is not None:
        rows.append({"method": "dense", "density": 1.0, "test_accuracy": results["dense_test_accuracy"]})
    rows.append({"method": f"{results['after']} ticket", "density": results["source_density"],
                 "test_accuracy": results.get("source_test_accuracy")})
    rows.append(results)
    print_table(rows, title=f"{method} after {results['after']}"
                + (f" (level {results['level']})" if results.get("level") is not None else ""))
    kept = ", ".join(f"{n.removesuffix('.weight')} {k}/{t}" for n, (k, t) in results["channels"].items())
    print(f"rows kept per layer: {kept}")
    print(f"run folder: {results['run_dir']}")
    return 0


def _export_folder(run_dir: Path, info: dict, kind: str) -> Path:
    base = run_dir / f"level_{info['level']}" if info.get("level") is not None else run_dir
    return base / f"export-{kind}"


def _portable_formats(text: str) -> tuple[str, ...]:
    from lottery.errors import ConfigError
    from lottery.export import PORTABLE_FORMATS

    names = tuple(t.strip().lower() for t in text.split(",") if t.strip())
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in PORTABLE_FORMATS]
    if unknown or not names:
        raise ConfigError(f"--portable takes a comma-separated list of {', '.join(PORTABLE_FORMATS)}, or none; "
                          f"got {text!r}")
    return names


def cmd_export(args: argparse.Namespace) -> int:
    from lottery.errors import ConfigError
    from lottery.export import export_model, save_export
    from lottery.export import PORTABLE_FORMATS as PORTABLE
    from lottery.pipelines.structured import load_run_network, run_preprocessing

    if not args.run_dir.is_dir():
        raise ConfigError(f"{args.run_dir} is not a folder")
    portable = _portable_formats(args.portable)
    model, mask, info = load_run_network(args.run_dir, args.level)
    preprocessing = None if args.no_preprocessing else run_preprocessing(args.run_dir)
    exported = export_model(model, mask, args.to, input_shape=tuple(info["input_shape"]), check_inputs=args.check_inputs,
                            preprocessing=preprocessing)
    folder = args.out or _export_folder(args.run_dir, info, args.to)
    save_export(folder, exported, extra={"source": info}, portable=portable)
    d = exported.description
    print(f"export ({args.to}) of {info['run_dir']}" + (f" level {info['level']}" if info.get("level") is not None else ""))
    print(f"{'layer':28s} {'out':>12s} {'in':>12s}")
    for name, layer in d["layers"].items():
        print(f"{name:28s} {layer['out']:>5d}/{layer['out_original']:<6d} {layer['in']:>5d}/{layer['in_original']:<6d}")
    size = d["size"]
    print(f"parameters: {size['parameters']} stored ({size['nonzero_parameters']} non-zero) vs "
          f"{size['original_parameters']} in the original network ({size['original_nonzero_parameters']} kept by the mask)")
    c = d["check"]
    print(f"check: max |masked - exported| = {c['max_abs_diff']:.3g} on {c['inputs']} random inputs "
          f"(tolerance {c['tolerance']:.3g})")
    if d.get("semi"):
        layers = d["semi"]["layers"]
        two_four = [f"{n} ({e['shape'][0]}x{e['shape'][1]})" for n, e in layers.items() if e["eligible"]]
        print(f"{d['semi']['pattern']} Linear layers: {', '.join(two_four)}: stored dense, run on sparse tensor cores "
              "once loaded on a CUDA GPU of compute capability >= 8.0 in float16/bfloat16 (load_export(folder, "
              "device='cuda', dtype=torch.float16)); elsewhere as dense masked layers")
        others = [f"{n} ({e['why']})" for n, e in layers.items() if not e["eligible"]]
        if others:
            print("always dense masked: " + ", ".join(others))
    pre = d.get("preprocessing")
    print("inputs: " + (f"raw pixels in [0, 1], normalised inside with mean {pre['mean']} std {pre['std']}" if pre
                        else "normalised as in training (--no-preprocessing)"))
    files = [folder / "model.safetensors", folder / "model.json"]
    files += [folder / PORTABLE[fmt] for fmt in portable]
    print("written: " + ", ".join(str(f) for f in files))
    return 0


def _parse_ints(text: str, what: str) -> tuple[int, ...]:
    from lottery.errors import ConfigError

    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{what} must be positive integers, got {text!r}")
    return values


def latency_variants(model, mask, kinds, exported=None, input_shape=None) -> tuple[dict, dict]:
    """``dense`` (the full-size network, no mask), for convolutional networks also ``dense:channels_last``
    (the same network in NHWC memory, the layout the block exports' convolutions run in and often the
    faster one: a block export's speed-up is only fair against the faster dense row), ``masked`` (the
    ticket with its hard mask, as trained) and ``export:<kind>`` for each kind (or the given ``exported``:
    ``(kind, module, description)``); and the exports' descriptions (model.json) by variant name."""
    import copy

    import torch

    from lottery import masking
    from lottery.export import export_model

    dense = copy.deepcopy(model).eval()
    masked = copy.deepcopy(model)
    if mask is not None:
        masking.attach_hard_mask(masked, mask)
    variants = {"dense": dense}
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        variants["dense:channels_last"] = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    variants["masked"] = masked.eval()
    descriptions = {}
    if exported is not None:
        variants[f"export:{exported[0]}"] = exported[1]
        descriptions[f"export:{exported[0]}"] = exported[2]
    for kind in kinds:
        e = export_model(model, mask, kind, input_shape=input_shape)
        variants[f"export:{kind}"] = e.module
        descriptions[f"export:{kind}"] = e.description
    return variants, descriptions


def semi_on_device(module, description: dict, device: str, dtype: str):
    """A copy of a ``semi`` export on ``device`` in ``dtype`` with its 2:4 Linear layers converted where that
    device allows it; returns ``(module, converted layer paths, the one line saying what happened)``."""
    import copy

    import torch

    from lottery.export import semi_modules, semi_structured

    lines: list[str] = []
    net = copy.deepcopy(module).to(device=device, dtype=getattr(torch, dtype))
    _, converted = semi_structured(net, semi_modules(description), log=lines.append)
    return net, converted, lines[0]


def _semi_cost_mask(net, converted: list[str]) -> dict:
    """For the FLOPs column: a converted 2:4 layer multiplies half of its weights (the kernels skip the
    other half whatever their values); an unconverted one all of them."""
    import torch

    out = {}
    for path in converted:
        w = net.get_submodule(path).weight
        out[f"{path}.weight"] = (torch.arange(w.shape[1]) % 4 < 2).expand(w.shape[0], -1)
    return out


def cmd_bench_latency(args: argparse.Namespace) -> int:
    import torch

    from lottery.errors import ConfigError
    from lottery.cost import cost_fields
    from lottery.export import load_export
    from lottery.io import write_json
    from lottery.latency import LatencySettings, format_latency_table, measure_latency
    from lottery.pipelines.structured import load_run_network

    path: Path = args.path
    exported = None
    if (path / "model.json").exists():
        loaded = load_export(path, log=lambda line: None)  # on the CPU; a semi export is converted per device below
        source = loaded.description.get("source") or {}
        if not source.get("run_dir"):
            raise ConfigError(f"{path / 'model.json'} does not name its source run; cannot build the dense baseline")
        model, mask, info = load_run_network(source["run_dir"], source.get("level"))
        exported = (loaded.description["kind"], loaded.module, loaded.description)
        kinds: list[str] = []
    elif path.is_dir():
        model, mask, info = load_run_network(path, args.level)
        if args.to == AUTO:
            method = info.get("method")
            kinds = (["dense"] if method in ("refill", "refill+") else ["dense", "blocks"] if method == "regroup"
                     else ["dense", "semi"] if method == "nm" else ["dense", "csr"])
        else:
            kinds = [k.strip() for k in args.to.split(",") if k.strip()]
    else:
        raise ConfigError(f"{path} is neither a run folder nor an export folder")
    shape = tuple(info["input_shape"])
    variants, descriptions = latency_variants(model, mask, kinds, exported, shape)
    devices = ["cpu", "cuda"] if args.device == "auto" and torch.cuda.is_available() else (
        ["cpu"] if args.device == "auto" else [args.device])
    reports = []
    for device in devices:
        settings = LatencySettings(batch_sizes=_parse_ints(args.batch_sizes, "--batch-sizes"), warmup=args.warmup,
                                   repeats=args.repeats, threads=args.threads, device=device, dtype=args.dtype)
        timed, notes, cost_masks = dict(variants), {}, {"masked": mask}
        if "export:semi" in variants:  # converted for this device, or the dense masked layers and a note why
            net, converted, line = semi_on_device(variants["export:semi"], descriptions["export:semi"], device,
                                                  args.dtype)
            timed["export:semi"] = net
            cost_masks["export:semi"] = _semi_cost_mask(net, converted)
            if not converted:
                notes["export:semi"] = f"timed as the dense masked network ({line})"
            else:
                notes["export:semi"] = line
        report = measure_latency(timed, shape, settings, baseline="dense")
        report["source"] = info
        report["notes"] = notes
        report["cost"] = {name: cost_fields(variants[name], cost_masks.get(name), shape) for name in timed}
        reports.append(report)
        print(format_latency_table(report))
        print()
    if args.json is not None:
        write_json(args.json, reports if len(reports) > 1 else reports[0])
        print(f"written: {args.json}")
    return 0
