"""Structured tickets (refill, refill+, regroup) of IMP-R and CS tickets on Conv-4 / Fashion-MNIST, retrained
from the rewind point, and what they buy: latency of the dense, masked and exported networks side by side.

Per seed: IMP-R (layerwise magnitude pruning, ``--imp-levels`` levels at ``--imp-rate``; level 0 is the
dense network), a CS ticket search, then refill, refill+ and regroup of IMP-R's last level and of the CS
mask, each retrained from the rewind point. Then, per seed, ONE interleaved latency measurement of every
variant (dense network, masked tickets, channel exports, block exports of the regroup tickets, CSR export
of the IMP ticket) at batch 1 and 64 with a fixed thread count. Every run is a lottery run folder, so a
killed benchmark resumes; latencies are kept in ``latency_s<seed>.json``.

Why this recipe (it must fit in ~30-40 min on 2 CPU cores): Conv-4 is the smallest network of the target
list whose cost is in its convolutions (75 M multiply-adds per 28x28 image, 97% of them in conv2-4), so
channel tickets can show real speed-ups; a full Fashion-MNIST epoch of it costs ~3-5 min on one core, and
a benchmark run trains ~13 networks per seed. So every network trains for ``--steps`` iterations (250 at
batch 128 = 0.53 epoch) with Adam (lr 1e-3, cosine decay); the dense reference trains with the very same
recipe, so "matching" compares like with like. No validation hold-out (only the final test accuracy is
reported; nothing is selected on it). IMP is layerwise so that each conv layer loses the same fraction
of its weights (global magnitude pruning would prune the 1.6 M-weight FC layer and leave the convs, i.e.
the run time, nearly untouched). CS uses the reference s0 = 0 and lam = 1e-8, two rounds as long as the
training, the temperature annealed per iteration (a per-epoch schedule would never anneal within a
half-epoch round) and mask logits trained by SGD at lr 0.1 (the weights' Adam lr would barely move them);
calibrated on seed 0 at 300 steps: density 9.6% (conv layers 19-25%, FC 8-11%), ticket 88.25% test
accuracy. Jobs are split finely (IMP and CS per seed, then every structured ticket
on its own) so that two workers stay busy.

    python benchmarks/structured_fashion.py --seeds 0,1,2 --workers 2
    python benchmarks/structured_fashion.py --report-only     # tables of whatever has finished

Regroup for speed (issue 22): ``--regroup-columns channel`` makes every conv block a few whole input
channels, so a layer's blocks run as one grouped convolution; ``--regroup-rows 32,32`` makes the groups
32 rows high (the paper's 16-32 gives 16-row groups on Conv-4's 64-row layers, and oneDNN ran 16-row groups
about 1.2-1.3x slower than 32-row ones for the same multiply-adds). Only the regroup tickets, reusing the
IMP-R and CS sources of an earlier run (copy its ``search-*`` folders into the new ``--out``; otherwise they
train first, about 11 CPU-minutes per seed):

    python benchmarks/structured_fashion.py --seeds 0,1,2 --workers 2 --methods regroup \
        --regroup-columns channel --regroup-rows 32,32 --out benchmarks/out/structured_fashion_channel32

Each regroup ticket's block export is also evaluated on the test set (it must equal the ticket's accuracy),
and a ``dense channels_last`` variant (the dense network in the memory layout the block exports use) is
timed beside the others.

On a GPU the same recipe trains long enough to recover what channel removal costs: ``--device cuda``
trains every network there (several workers share one GPU), ``--cuda`` also times the networks on the
GPU (``--cuda-batches``), and the CPU latency is still measured at ``--threads`` threads after all
training has ended. The 10-epoch run of benchmarks/RESULTS.md (one H100, about 11 minutes in all):

    python benchmarks/structured_fashion.py --device cuda --seeds 0,1,2 --workers 12 --steps 9380 \
        --rewind 250it --cuda --out benchmarks/out/structured_fashion_gpu_10ep
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, mean_std, read_results, run_parallel  # noqa: E402

METHODS = ("refill", "refill+", "regroup")
TARGET_SPEEDUP = 2.86  # 65% of the dense network's time saved
MATCH = 0.002  # matching: mean test accuracy within 0.2 points of the dense network's


def recipe(args):
    from lottery.hparams import DataHparams, ModelHparams, TrainingHparams

    data = DataHparams(dataset="fashion-mnist", val_size=0)
    model = ModelHparams(model="conv4")
    training = TrainingHparams(training_steps=f"{args['steps']}it", batch_size=args["batch"], optimizer="adam", lr=1e-3,
                               schedule="cosine", eval_every=f"{args['steps']}it")
    return data, model, training


def imp_job(args: dict, seed: int):
    from lottery.experiment import RunOptions
    from lottery.methods.imp import IMPHparams
    from lottery.pipelines.imp import IMPJob, run_imp

    data, model, training = recipe(args)
    hp = IMPHparams(levels=args["imp_levels"], rate=args["imp_rate"], scope="layerwise", rewind=args["rewind"])
    return run_imp(IMPJob(data, model, training, hp, seed=seed),
                   RunOptions(out=args["out"], progress=False, data_dir=args["data_dir"], device=args["device"]))


def cs_job(args: dict, seed: int):
    from lottery.experiment import RunOptions
    from lottery.methods.cs import CSHparams
    from lottery.pipelines.cs import CSJob, run_cs

    data, model, training = recipe(args)
    # The recipe of this benchmark's tables (before CS's default changed on 2026-12-02): logits on the
    # weights' optimizer group by SGD, beta annealed per iteration to 200.
    hp = CSHparams(s0=args["cs_s0"], lam=args["cs_lam"], rounds=args["cs_rounds"], rewind=args["rewind"],
                   temperature_schedule="iteration", mask_lr=args["cs_mask_lr"], mask_optimizer="sgd",
                   beta_final=200.0)
    return run_cs(CSJob(data, model, training, hp, seed=seed, dense_reference=False),
                  RunOptions(out=args["out"], progress=False, data_dir=args["data_dir"], device=args["device"]))


def structure_job(args: dict, source: str, method: str):
    from lottery.experiment import RunOptions
    from lottery.methods.structured import StructuredHparams
    from lottery.pipelines.structured import StructureJob, run_structure

    hp = StructuredHparams(method=method, fillback_rate=args["fillback"], columns=args["regroup_columns"],
                           **_regroup_rows(args))
    return run_structure(StructureJob(Path(source), hp),
                         RunOptions(out=args["out"], progress=False, data_dir=args["data_dir"], device=args["device"]))


def _regroup_rows(args: dict) -> dict:
    """Regroup's block heights from ``--regroup-rows MIN,MAX`` (the defaults 16,32 are the paper's)."""
    lo, hi = (int(v) for v in args.get("regroup_rows", "16,32").split(","))
    return {"min_rows": lo, "max_rows": hi}


def _methods(args: dict) -> tuple[str, ...]:
    return tuple(m.strip() for m in args.get("methods", ",".join(METHODS)).split(",") if m.strip())


def _export_accuracy(args: dict, module, seed: int) -> float:
    """Test accuracy of an exported network on the run's test set (Fashion-MNIST, normalised as in training):
    it must equal the masked ticket's, since the export computes the same outputs."""
    import torch

    from lottery.data import load_train_test, make_loader

    _, test = load_train_test("fashion-mnist", args["data_dir"])
    correct = total = 0
    with torch.inference_mode():
        for x, y in make_loader(test, 1000, train=False, seed=seed):
            correct += int((module(x).argmax(1) == y).sum())
            total += int(y.numel())
    return correct / total


def _finished(out: Path, prefix: str, seed: int | None = None) -> list[dict]:
    # run_dir: the folder found here (results.json records the path the run was made at, which is stale in
    # a copied folder, e.g. sources copied from an earlier benchmark's --out)
    return [{**r, "run_dir": str(folder)} for folder, r in read_results(out, f"{prefix}*/results.json")
            if seed is None or r.get("seed") == seed]


def latency_job(args: dict, seed: int) -> dict | None:
    """One interleaved measurement of every variant of this seed (dense, masked, exports)."""
    import copy

    import torch

    from lottery import masking
    from lottery.export import export_model
    from lottery.io import write_json
    from lottery.cost import cost_fields
    from lottery.latency import LatencySettings, format_latency_table, measure_latency
    from lottery.pipelines.structured import load_run_network

    out = Path(args["out"])
    path = out / f"latency_s{seed}.json"
    if path.exists() and not args["redo_latency"]:
        return json.loads(path.read_text())
    imp = [r for r in _finished(out, "search-imp_", seed)]
    cs = [r for r in _finished(out, "search-cs_", seed)]
    structured = _finished(out, "structure-", seed)
    if not imp or not cs or len(structured) < 2 * len(_methods(args)):
        print(f"seed {seed}: runs missing, no latency measurement")
        return None
    variants: dict[str, torch.nn.Module] = {}
    sizes: dict[str, dict] = {}
    masks: dict[str, object] = {}  # the weight mask of each masked network, for its FLOPs
    variants["dense"] = load_run_network(imp[0]["run_dir"], 0)[0].eval()
    # the same dense network in channels_last memory: the block exports compute in that layout, which alone
    # makes Conv-4's convolutions and max-pools faster on oneDNN; timed beside them so that their speed-up
    # can be split into what the layout gives and what the blocks give
    variants["dense channels_last"] = copy.deepcopy(variants["dense"]).to(memory_format=torch.channels_last)
    for name, run in (("imp", imp[0]["run_dir"]), ("cs", cs[0]["run_dir"])):
        model, mask, _ = load_run_network(run)
        masked = load_run_network(run)[0]
        masking.attach_hard_mask(masked, mask)
        variants[f"{name} masked"] = masked.eval()
        masks[f"{name} masked"] = mask
        if name == "imp":
            e = export_model(model, mask, "csr")
            variants["imp csr"] = e.module
            sizes["imp csr"] = e.description["size"]
    for r in structured:
        model, mask, _ = load_run_network(r["run_dir"])
        kinds = ("dense", "blocks") if r["method"] == "regroup" else ("dense",)
        for kind in kinds:
            e = export_model(model, mask, kind)
            label = f"{r['after']} {r['method']} {'channels' if kind == 'dense' else 'blocks'}"
            variants[label] = e.module
            sizes[label] = e.description["size"]
            if kind == "blocks":  # the block export classifies the test set as the masked ticket did
                sizes[label]["test_accuracy"] = _export_accuracy(args, e.module, seed)
                sizes[label]["ticket_test_accuracy"] = r["test_accuracy"]
                print(f"seed {seed} {label}: test accuracy {100 * sizes[label]['test_accuracy']:.2f} % "
                      f"(the masked ticket: {100 * r['test_accuracy']:.2f} %)")
    settings = LatencySettings(batch_sizes=(1, 64), warmup=args["warmup"], repeats=args["repeats"],
                               threads=args["threads"], device="cpu")
    report = measure_latency(variants, (1, 28, 28), settings, baseline="dense")
    report["sizes"] = sizes
    # What each variant costs to evaluate (multiply-accumulates per example): exports at their real,
    # smaller shapes; masked networks by their kept weights (lottery.cost)
    report["cost"] = {label: cost_fields(net, masks.get(label), (1, 28, 28)) for label, net in variants.items()}
    report["seed"] = seed
    write_json(path, report)
    print(f"\nseed {seed}\n" + format_latency_table(report))
    if args["cuda"] and torch.cuda.is_available():
        gpu = measure_latency(variants, (1, 28, 28),
                              LatencySettings(batch_sizes=tuple(int(b) for b in args["cuda_batches"].split(",")),
                                              warmup=args["warmup"], repeats=args["repeats"], device="cuda"),
                              baseline="dense")
        report["cuda"] = gpu
        write_json(path, report)
        print(format_latency_table(gpu))
    return report


def flops_job(args: dict, seed: int) -> dict | None:
    """FLOPs per example of every variant of this seed without training the structured tickets: their
    masks (and so their exports' shapes) depend only on the source ticket's mask and weights, not on the
    retraining. For the tables of runs whose folders were not kept, once the sources are rerun."""
    import copy

    import torch

    from lottery import masking
    from lottery.cost import cost_fields
    from lottery.experiment import build_model_without_data
    from lottery.export import dead_channel_params, export_model
    from lottery.methods.structured import StructuredHparams
    from lottery.pipelines.structured import read_source, structured_mask

    out = Path(args["out"])
    imp, cs = _finished(out, "search-imp_", seed), _finished(out, "search-cs_", seed)
    if not imp or not cs:
        print(f"seed {seed}: source runs missing")
        return None
    shape = (1, 28, 28)
    found: dict[str, dict] = {"seed": seed, "accuracy": {}, "flops": {}, "channels": {}}
    for after, run in (("imp", imp[0]["run_dir"]), ("cs", cs[0]["run_dir"])):
        src = read_source(run)
        model = build_model_without_data(src.data, src.model)
        model.load_state_dict(masking.to_plain_state_dict(src.weights, apply_masks=False))
        if after == "imp":
            found["flops"]["dense"] = cost_fields(model, None, shape)["flops_sparse"]
        found["flops"][f"{after} masked"] = cost_fields(model, src.mask, shape)["flops_sparse"]
        found["accuracy"][f"{after} ticket"] = src.info.get("source_test_accuracy")
        for method in _methods(args):
            hp = StructuredHparams(method=method, fillback_rate=args["fillback"], columns=args["regroup_columns"],
                                   **_regroup_rows(args))
            mask = structured_mask(model, src.mask, src.weights, hp)
            # As the structured retraining holds them: the bias (and BatchNorm) of every removed row at 0,
            # so that the row outputs exactly 0 and the channel export drops it.
            ticket = copy.deepcopy(model)
            with torch.no_grad():
                for name, keep in dead_channel_params(ticket, mask).items():
                    ticket.get_parameter(name)[~keep] = 0.0
            for kind in (("dense", "blocks") if method == "regroup" else ("dense",)):
                label = f"{after} {method} {'channels' if kind == 'dense' else 'blocks'}"
                found["flops"][label] = cost_fields(export_model(ticket, mask, kind, check_inputs=2).module, None,
                                                    shape)["flops_sparse"]
            found["channels"][f"{after} {method}"] = {n: int(m.reshape(m.shape[0], -1).any(1).sum())
                                                      for n, m in mask.items()}
    return found


def flops_report(found: list[dict]) -> None:
    print(f"machine: {machine()}\n")
    for key in ("imp ticket", "cs ticket"):
        a, sd = mean_std([f["accuracy"][key] for f in found if f["accuracy"].get(key) is not None])
        print(f"{key}: test accuracy {100 * a:.2f} ± {100 * sd:.2f} over {len(found)} seeds")
    print("\n| variant | FLOPs/example (mean over seeds) | speed-up (FLOPs) over dense |")
    print("|---|---|---|")
    for label in found[0]["flops"]:
        vals = [f["flops"][label] for f in found]
        ratio = [f["flops"]["dense"] / f["flops"][label] for f in found]
        print(f"| {label} | {mean_std(vals)[0]:,.0f} | {mean_std(ratio)[0]:.2f}x |")
    print("\nrows kept per layer (per seed):")
    for f in found:
        print(f"seed {f['seed']}: " + "; ".join(f"{k}: {list(v.values())}" for k, v in f["channels"].items()))


def report(out: Path, methods: tuple[str, ...] = METHODS) -> None:
    print(f"report made on: {machine()} (the latency tables name the machine they were measured on)\n")
    imp = _finished(out, "search-imp_")
    cs = _finished(out, "search-cs_")
    structured = _finished(out, "structure-")
    dense = [r["levels"][0] for r in imp if r.get("levels")]
    d_mean, d_std = mean_std([r["test_accuracy"] for r in dense])
    rows = [("dense (IMP level 0)", dense, None)]
    if imp:
        last = max(len(r["levels"]) for r in imp) - 1
        rows.append((f"IMP-R ticket (level {last}, layerwise)", [r["levels"][last] for r in imp if len(r["levels"]) > last], None))
    rows.append(("CS ticket", cs, None))
    for after in ("imp", "cs"):
        for method in methods:
            rows.append((f"{method} after {after.upper()}", [r for r in structured if r["after"] == after and r["method"] == method], (after, method)))
    lat = [json.loads(p.read_text()) for p in sorted(out.glob("latency_s*.json"))]

    def speed(label: str, batch: str) -> str:
        vals = [r["speedup"][batch][label] for r in lat if label in r["speedup"].get(batch, {})]
        if not vals:
            return "-"
        m, sd = mean_std(vals)
        return f"{m:.2f}x ± {sd:.2f}"

    def flops(label: str) -> str:
        vals = [r["cost"][label]["flops_sparse"] for r in lat if label in r.get("cost", {})]
        return f"{mean_std(vals)[0]:,.0f}" if vals else "-"

    def flops_speedup(label: str) -> str:
        """The dense network's FLOPs over this variant's (an export's own count is of its smaller shapes)."""
        vals = [r["cost"]["dense"]["flops_sparse"] / r["cost"][label]["flops_sparse"] for r in lat
                if label in r.get("cost", {}) and r["cost"][label]["flops_sparse"]]
        return f"{mean_std(vals)[0]:.2f}x" if vals else "-"

    def params(label: str) -> str:
        vals = [r["sizes"][label]["parameters"] / r["sizes"][label]["original_parameters"] for r in lat if label in r.get("sizes", {})]
        return f"{mean_std(vals)[0]:.3f}" if vals else "-"

    print("Accuracy (test, mean ± sample std over seeds) and CPU latency speed-up over the dense network "
          "(median of interleaved timings, 1 thread, mean ± std over seeds)\n")
    print("| network | mask density | exported size / dense | FLOPs/example | speed-up (FLOPs) | test acc % | "
          "Δ vs dense (points) | speed-up batch 1 | speed-up batch 64 | seeds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    hits = []
    for name, runs, key in rows:
        if not runs:
            continue
        a, asd = mean_std([r["test_accuracy"] for r in runs])
        dens, _ = mean_std([r.get("density", 1.0) for r in runs])
        if key is None:
            label = {"dense (IMP level 0)": "dense", "CS ticket": "cs masked"}.get(name, "imp masked")
            size = "1.000" if label == "dense" else "-"
            labels = [label]
        else:
            after, method = key
            labels = [f"{after} {method} channels"] + ([f"{after} {method} blocks"] if method == "regroup" else [])
            size = params(labels[0])
        for label in labels:
            tag = name if len(labels) == 1 else f"{name} ({label.split()[-1]} export)"
            print(f"| {tag} | {dens:.4f} | {size if label == labels[0] else '-'} | {flops(label)} | "
                  f"{flops_speedup(label)} | {100 * a:.2f} ± {100 * asd:.2f} | "
                  f"{100 * (a - d_mean):+.2f} | {speed(label, '1')} | {speed(label, '64')} | {len(runs)} |")
            if key is not None and lat:
                s64 = [r["speedup"]["64"].get(label) for r in lat if label in r["speedup"]["64"]]
                if s64 and a >= d_mean - MATCH and mean_std(s64)[0] >= TARGET_SPEEDUP:
                    hits.append(f"{tag}: {100 * a:.2f}% vs dense {100 * d_mean:.2f}%, {mean_std(s64)[0]:.2f}x at batch 64")
    if imp and "imp csr" in (lat[0]["speedup"]["64"] if lat else {}):
        print(f"| IMP-R ticket, CSR export of its Linear layers | - | {params('imp csr')} | {flops('imp csr')} | "
              f"{flops_speedup('imp csr')} | - | - | "
              f"{speed('imp csr', '1')} | {speed('imp csr', '64')} | {len(lat)} |")
    gpu = [r["cuda"] for r in lat if "cuda" in r]
    if gpu:
        batches = [str(b) for b in gpu[0]["settings"]["batch_sizes"]]
        print(f"\nGPU ({gpu[0]['machine']['device']}): speed-up over the dense network, median of interleaved "
              "timings, mean ± std over seeds\n")
        print("| network | " + " | ".join(f"batch {b}" for b in batches) + " |")
        print("|---|" + "---|" * len(batches))
        for label in gpu[0]["speedup"][batches[0]]:
            cells = [mean_std([g["speedup"][b][label] for g in gpu if label in g["speedup"].get(b, {})]) for b in batches]
            print(f"| {label} | " + " | ".join(f"{m:.2f}x ± {sd:.2f}" for m, sd in cells) + " |")
        dense_ms = {b: statistics.median(r["median_ms"] for g in gpu for r in g["rows"]
                                         if r["variant"] == "dense" and str(r["batch"]) == b) for b in batches}
        print("\ndense network's median ms (median over seeds): "
              + ", ".join(f"batch {b} {ms:.3f}" for b, ms in dense_ms.items()))
    print(f"\ntarget (matching within {100 * MATCH:.1f} points and >= {TARGET_SPEEDUP}x at batch 64): "
          + ("; ".join(hits) if hits else "not met by any structured ticket"))
    if lat:
        s = lat[0]["settings"]
        print(f"latency settings: {s['warmup']} warm-up calls, {s['repeats']} interleaved timings per variant and "
              f"batch size, {s['threads']} thread(s), {lat[0]['machine']['platform']}, torch {lat[0]['machine']['torch']}")
        print("\nPer-seed latency tables:\n")
        from lottery.latency import format_latency_table

        for r in lat:
            print(f"seed {r['seed']}\n")
            print(format_latency_table(r))
            print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/out/structured_fashion")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--steps", type=int, default=250, help="training iterations of every network")
    ap.add_argument("--batch", type=int, default=64, help="training batch size")
    ap.add_argument("--rewind", default="25it", help="rewind point k of IMP-R and CS")
    ap.add_argument("--imp-levels", type=int, default=2)
    ap.add_argument("--imp-rate", type=float, default=0.5)
    ap.add_argument("--cs-s0", type=float, default=0.0)
    ap.add_argument("--cs-lam", type=float, default=1e-8)
    ap.add_argument("--cs-rounds", type=int, default=2)
    ap.add_argument("--cs-mask-lr", type=float, default=0.1)
    ap.add_argument("--fillback", type=float, default=0.2, help="refill+ fill-back rate")
    ap.add_argument("--regroup-columns", default="element", choices=("element", "channel"),
                    help="regroup's block columns: im2col elements (the paper's) or whole input channels")
    ap.add_argument("--regroup-rows", default="16,32",
                    help="regroup's MIN,MAX rows of a block (the paper's 16,32; 32,32 runs faster: larger groups)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="structured methods to train and time (comma-separated subset of refill,refill+,regroup)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the latency measurement")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--cuda", action="store_true", help="also time on the GPU when there is one")
    ap.add_argument("--cuda-batches", default="1,64,1024", help="batch sizes of the GPU timing")
    ap.add_argument("--device", default="cpu", help="where the networks train: cpu or cuda")
    ap.add_argument("--threads-per-worker", type=int, default=1, help="torch CPU threads of each training worker")
    ap.add_argument("--redo-latency", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--flops-only", action="store_true",
                    help="train the source tickets only and count every variant's FLOPs (no structured retraining, "
                         "no timing)")
    args = ap.parse_args()
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = {k: getattr(args, k) for k in ("steps", "batch", "rewind", "imp_levels", "imp_rate", "cs_s0", "cs_lam", "cs_rounds",
                                         "cs_mask_lr", "fillback", "regroup_columns", "threads", "warmup", "repeats", "cuda",
                                         "redo_latency", "data_dir", "cuda_batches", "device", "regroup_rows",
                                         "methods")}
    cfg["out"] = str(out)
    unknown = sorted(set(_methods(cfg)) - set(METHODS))
    if unknown or not _methods(cfg):
        ap.error(f"--methods takes a comma-separated subset of {','.join(METHODS)}, got {args.methods!r}")
    try:
        lo, hi = _regroup_rows(cfg).values()
        assert 1 <= lo <= hi
    except (ValueError, AssertionError):
        ap.error(f"--regroup-rows takes MIN,MAX with 1 <= MIN <= MAX, e.g. 32,32; got {args.regroup_rows!r}")
    if not args.report_only:
        sources = run_parallel(_source_job, [(cfg, kind, s) for s in seeds for kind in ("imp", "cs")], args.workers,
                               args.threads_per_worker)
        if args.flops_only:
            flops_report([f for f in (flops_job(cfg, s) for s in seeds) if f is not None])
            return
        jobs = [(cfg, r["run_dir"], m) for r in sources for m in _methods(cfg)]
        run_parallel(structure_job, jobs, args.workers, args.threads_per_worker)
        for s in seeds:  # one process at a time: nothing else of ours runs during a timing
            latency_job(cfg, s)
    report(out, _methods(cfg))


def _source_job(cfg: dict, kind: str, seed: int):
    return imp_job(cfg, seed) if kind == "imp" else cs_job(cfg, seed)


if __name__ == "__main__":
    main()
