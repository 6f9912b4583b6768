"""Speed of the training loop: what masking costs, how the engine compares with a plain PyTorch loop,
which optional fast paths pay, how to use the cores for sweeps, memory, and cost against model size.

Every figure is a ratio of runs measured side by side in this one process (variants interleaved, the
order rotated every repeat, the median of the repeats), on the real Fashion-MNIST training set, with a
fixed torch thread count. Absolute times are printed only to show the scale; the ratios are the claims.

Parts (``--parts``, default all):

* ``overhead``: training iterations of the same network dense, with a hard mask (a 20 % random mask,
  as when a ticket is retrained) and with CS soft masks (a CS search step: logits, temperature, penalty,
  the logits' optimizer), through the engine (:class:`lottery.engine.Trainer`). The hard-mask run keeps
  pruned weights at 0 as the pipelines do (``EnforceMaskCallback``: gradient mask, re-zeroing only when a
  mask changes); ``hard_every_step`` re-zeroes them after every step as well. LeNet-300-100 and Conv-2
  (the conv network: its cost is in its convolutions).
* ``maskops``: the operations a hard mask needs per step on LeNet's first layer (300 x 784), with a
  bool mask (``torch.where``, ``masked_fill_``) against a multiply by the mask as 0/1 floats, beside
  one forward+backward of the dense LeNet step for scale; and the per-step re-zeroing pass over a whole
  hard-masked LeNet against the mask-change check that replaced it.
* ``loop``: one epoch of LeNet-300-100 through the engine (the in-memory BatchLoader) against a plain
  loop (``DataLoader`` over a dataset that normalises one sample at a time, as torchvision datasets do,
  and ``torch.optim.SGD``), and against a plain loop over pre-normalised tensors.
* ``options``: candidate fast paths, each against the default: ``torch.compile`` (CPU inductor) of the
  LeNet and CS-LeNet training step, channels_last for Conv-2, SGD with ``foreach=True``, and the
  evaluation batch (1000 against the training batch 128).
* ``workers``: experiments per hour of a small sweep (4 dense LeNet trainings of 2 epochs, with
  evaluation) with 1 worker x 2 threads against 2 workers x 1 thread, through :func:`lottery.sweep.run_sweep`.
* ``memory``: how much the peak resident memory grows while a fresh process trains dense, and while one
  runs a CS search, on the same model and data (the peak is reset once data and model are loaded).
* ``scaling``: time per epoch (from timed iterations) of ResNet-20 at widths 1, 2 and 4 and of
  Conv-2/4/6, so users can predict the cost of their own runs.

    python benchmarks/speed.py                       # everything (~15 min on an idle 2-core machine)
    python benchmarks/speed.py --parts overhead,loop --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PARTS = ("overhead", "maskops", "csfloor", "loop", "options", "workers", "memory", "scaling")


# ---------------------------------------------------------------------------------------------- data
_DATA: dict[str, Any] = {}


def bundle():
    """Fashion-MNIST (real data), loaded once, with the library's normalisation; no validation split."""
    if "b" not in _DATA:
        from lottery.experiment import RunOptions, load_data
        from lottery.hparams import DataHparams

        _DATA["b"] = load_data(DataHparams(dataset="fashion-mnist", val_size=0), RunOptions(out=tempfile.gettempdir()))
    return _DATA["b"]


def build(model: str, seed: int = 0, width: int | None = None):
    from lottery.experiment import build_model
    from lottery.hparams import ModelHparams

    return build_model(ModelHparams(model=model, width=width), bundle(), seed)


def recipe(iters: int, batch: int = 128, **kw):
    from lottery.hparams import TrainingHparams

    return TrainingHparams(training_steps=f"{iters}it", batch_size=batch, lr=0.05, eval_every=f"{iters}it", **kw)


def train_loader(batch: int = 128, seed: int = 0):
    from lottery.data import make_loader

    return make_loader(bundle().splits.train, batch, train=True, seed=seed, augment=False)


# --------------------------------------------------------------------------------------- the timing
def interleaved(variants: dict[str, Callable[[], Callable[[], None]]], repeats: int) -> dict[str, dict[str, float]]:
    """Time every variant ``repeats`` times, interleaved with a rotating order. A variant is a factory:
    it builds its state (untimed) and returns the function to time."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            run = variants[n]()
            t0 = time.perf_counter()
            run()
            times[n].append(time.perf_counter() - t0)
    return {n: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "repeats": len(t), "times": t}
            for n, t in times.items()}


def paired_ratio(res: dict[str, dict], name: str, base: str) -> float | None:
    """Median over repeats of (time of ``name`` / time of ``base`` in the same repeat). Why: the two ran
    back to back, so a slow phase of a shared machine slows both; the ratio of medians mixes phases."""
    a, b = res[name].get("times"), res[base].get("times")
    if not a or not b or len(a) != len(b):
        return None
    return statistics.median(x / y for x, y in zip(a, b))


def ratios(res: dict[str, dict[str, float]], base: str) -> dict[str, float]:
    return {n: r["median_s"] / res[base]["median_s"] for n, r in res.items()}


def table(title: str, res: dict[str, dict[str, float]], base: str, per: str = "run") -> str:
    rat = ratios(res, base)
    lines = [f"\n### {title}\n",
             f"| variant | median s / {per} | min | max | time / {base} | median of paired ratios |",
             "|---|---|---|---|---|---|"]
    for n, r in res.items():
        pr = paired_ratio(res, n, base)
        lines.append(f"| {n} | {r['median_s']:.4f} | {r['min_s']:.4f} | {r['max_s']:.4f} | {rat[n]:.3f} | "
                     f"{'' if pr is None else f'{pr:.3f}'} |")
    return "\n".join(lines)


def _quiet(_msg: str) -> None:
    pass


# ------------------------------------------------------------------------------------------ overhead
def engine_run(model_name: str, variant: str, iters: int, seed: int = 0, compile_model: bool = False,
               channels_last: bool = False, foreach: bool | None = None) -> Callable[[], Callable[[], None]]:
    """Factory: ``iters`` training iterations of ``model_name`` through the engine, dense / hard / cs."""

    def make():
        from lottery import masking
        from lottery.engine.trainer import Trainer, make_optimizer
        from lottery.masks import Mask
        from lottery.methods.cs import CSHparams, EnforceMaskCallback, make_search_optimizers, search_round_callbacks

        model = build(model_name, seed)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        hp = recipe(iters)
        names = masking.prunable_weights(model)
        callbacks = []
        if variant in ("hard", "hard_every_step"):
            gen = torch.Generator().manual_seed(seed)
            masking.attach_hard_mask(model, Mask({n: torch.rand(p.shape, generator=gen) < 0.2 for n, p in names.items()}))
            optimizers = [make_optimizer(model.parameters(), hp)]
            # as every ticket retraining and IMP level runs it; "hard_every_step": the re-zeroing pass after
            # every step that the callback used before it relied on the gradient mask (kept for comparison)
            callbacks = [EnforceMaskCallback(every_step=True if variant == "hard_every_step" else None)]
        elif variant == "cs":
            # the reference recipe (SGD logits, per-epoch temperature), as measured in RESULTS.md's Speed section
            cs = CSHparams(rounds=1, s0=0.0, mask_optimizer="sgd", temperature_schedule="epoch", beta_final=200.0)
            masking.attach_soft_mask(model, list(names), s0=cs.s0, scale_by_s0=cs.scale_by_s0)
            optimizers = make_search_optimizers(model, hp, cs)
            callbacks = search_round_callbacks(cs, 0)
        else:
            optimizers = [make_optimizer(model.parameters(), hp)]
        if foreach is not None:
            for opt in optimizers:
                for g in opt.param_groups:
                    g["foreach"] = foreach
        trainer = Trainer(model, train_loader(), hp, optimizers=optimizers, callbacks=callbacks,
                          progress=False, log=_quiet)
        if compile_model:
            trainer.train_module = torch.compile(model)
            trainer.train_module(next(iter(train_loader()))[0])  # compile outside the timing
        return trainer.fit

    return make


def part_overhead(args) -> str:
    out = []
    for model, iters in (("lenet_300_100", args.lenet_iters), ("conv2", args.conv_iters)):
        res = interleaved({v: engine_run(model, v, iters) for v in ("dense", "hard", "hard_every_step", "cs")},
                          args.repeats)
        out.append(table(f"Masking overhead: {model}, {iters} training iterations (batch 128)", res, "dense",
                         per=f"{iters} it"))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- maskops
def repeated_calls(fn: Callable[[], object], calls: int) -> Callable[[], Callable[[], None]]:
    """Factory for :func:`interleaved`: 10 warm-up calls of ``fn``, then a run of ``calls`` calls."""

    def make():
        for _ in range(10):
            fn()

        def run():
            for _ in range(calls):
                fn()
        return run
    return make


def part_maskops(args) -> str:
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(300, 784, generator=g)
    mask = torch.rand(300, 784, generator=g) < 0.2
    pruned, values = ~mask, mask.float()
    model = build("lenet_300_100", 0)
    x, y = next(iter(train_loader()))
    from lottery import masking
    from lottery.masks import Mask

    hard = build("lenet_300_100", 0)
    masking.attach_hard_mask(hard, Mask({n: torch.rand(p.shape, generator=g) < 0.2
                                         for n, p in masking.prunable_weights(hard).items()}))

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    ops = {
        "torch.where(bool mask, grad, 0)": lambda: torch.where(mask, grad, 0.0),
        "grad.masked_fill_(bool pruned, 0)": lambda: grad.masked_fill_(pruned, 0.0),
        "grad * float mask (new tensor)": lambda: grad * values,
        "grad.mul_(float mask) (in place)": lambda: grad.mul_(values),
        "dense LeNet step (forward + backward, batch 128)": step,
        # per step of a hard-masked LeNet: the re-zeroing pass the ticket retraining used to run after every
        # step, against the check that replaced it (EnforceMaskCallback: has a mask changed?)
        "enforce_masks(hard-masked LeNet): re-zero all 3 layers": lambda: masking.enforce_masks(hard),
        "hard_mask_version(hard-masked LeNet)": lambda: masking.hard_mask_version(hard),
    }
    calls = 200
    res = interleaved({k: repeated_calls(v, calls) for k, v in ops.items()}, args.repeats)
    lines = [f"\n### Mask operations on a 300 x 784 weight ({calls} calls per timing)\n",
             "| operation | median us / call | time / float multiply in place |", "|---|---|---|"]
    base = res["grad.mul_(float mask) (in place)"]["median_s"]
    for k, r in res.items():
        lines.append(f"| {k} | {1e6 * r['median_s'] / calls:.0f} | {r['median_s'] / base:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- csfloor
def part_csfloor(args) -> str:
    """A lower bound of CS's training-step overhead on LeNet-300-100, from its unavoidable parts.

    Whatever the implementation, a CS step does more than the dense one: the logits' own optimizer step
    (SGD, momentum 0.9, Nesterov: the reference recipe), a sigmoid over every logit in the forward (the
    soft mask) and at least one more elementwise pass in the backward (their gradient, from the saved
    sigmoid: a multiply-class pass). Each part is timed alone against the whole dense training step;
    their sum is the overhead of a perfectly fused CS step."""
    torch.manual_seed(0)
    model = build("lenet_300_100", 0)
    x, y = next(iter(train_loader()))
    from lottery import masking

    weights = list(masking.prunable_weights(model).values())
    logits = [torch.zeros_like(w, requires_grad=True) for w in weights]
    for t in logits:
        t.grad = torch.randn_like(t)
    dense_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logit_opt = torch.optim.SGD(logits, lr=0.1, momentum=0.9, nesterov=True)
    soft = build("lenet_300_100", 0)
    masking.attach_soft_mask(soft, list(masking.prunable_weights(soft)), s0=0.0)
    from lottery.methods.cs import CSHparams, make_search_optimizers
    from lottery.hparams import TrainingHparams

    cs_opts = make_search_optimizers(soft, TrainingHparams(lr=0.1), CSHparams(mask_optimizer="sgd"))

    def dense_step():
        dense_opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        dense_opt.step()

    def cs_step():
        for o in cs_opts:
            o.zero_grad(set_to_none=True)
        loss = F.cross_entropy(soft(x), y) + 1e-8 * masking.soft_mask_penalty(soft, reuse_forward=True)
        loss.backward()
        for o in cs_opts:
            o.step()

    def sigmoid_pass():
        for t in logits:
            torch.sigmoid(t.detach())

    def multiply_pass():
        for t, w in zip(logits, weights):
            torch.mul(t.detach(), w.detach())

    ops = {
        "dense LeNet training step (forward, backward, SGD step; batch 128)": dense_step,
        "CS search step as the trainer runs it (soft masks, penalty, both optimizers)": cs_step,
        "logits' SGD step alone (momentum 0.9, Nesterov)": logit_opt.step,
        "sigmoid over all logits (out of place)": sigmoid_pass,
        "one multiply over all logits (logits x weights, out of place)": multiply_pass,
    }
    calls = 100
    res = interleaved({k: repeated_calls(v, calls) for k, v in ops.items()}, args.repeats)
    names = list(ops)
    base = res[names[0]]["median_s"]
    lines = [f"\n### Lower bound of CS's step overhead, LeNet-300-100 ({sum(w.numel() for w in weights):,} logits; "
             f"{calls} calls per timing)\n", "| part | median us / call | / dense step |", "|---|---|---|"]
    for k in names:
        lines.append(f"| {k} | {1e6 * res[k]['median_s'] / calls:.0f} | {res[k]['median_s'] / base:.3f} |")
    floor = (res[names[2]]["median_s"] + res[names[3]]["median_s"] + res[names[4]]["median_s"]) / base
    lines.append(f"\nA perfectly fused CS step would still add the logits' optimizer step, the sigmoid and one "
                 f"multiply pass: "
                 f"{100 * floor:.1f} % of the dense step (measured CS step: +{100 * (res[names[1]]['median_s'] / base - 1):.0f} %).")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- loop
def plain_loop(per_sample: bool, epoch_iters: int) -> Callable[[], Callable[[], None]]:
    """Factory: one epoch of the straightforward PyTorch loop (DataLoader + SGD) on the same data."""

    def make():
        from torch.utils.data import DataLoader, TensorDataset

        sys.path.insert(0, str(Path(__file__).parent))
        from loader_throughput import PerSampleDataset

        split = bundle().splits.train
        images, labels = split.images, split.labels
        mean, std = split.mean, split.std
        if per_sample:
            ds = PerSampleDataset(images, labels, mean, std)
        else:
            m = torch.tensor(mean).view(1, -1, 1, 1)
            s = torch.tensor(std).view(1, -1, 1, 1)
            ds = TensorDataset((images.float() / 255 - m) / s, labels)
        loader = DataLoader(ds, batch_size=128, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        model = build("lenet_300_100", 0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)

        def run():
            model.train()
            for i, (x, y) in enumerate(loader):
                if i == epoch_iters:
                    break
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        return run

    return make


def part_loop(args) -> str:
    iters = len(train_loader())
    res = interleaved({
        "lottery engine": engine_run("lenet_300_100", "dense", iters),
        "plain loop, per-sample dataset": plain_loop(True, iters),
        "plain loop, pre-normalised tensors": plain_loop(False, iters),
    }, args.repeats)
    return table(f"Engine against a plain PyTorch loop: one epoch of LeNet-300-100 ({iters} it, batch 128)",
                 res, "lottery engine", per="epoch")


# ------------------------------------------------------------------------------------------- options
def eval_run(batch: int) -> Callable[[], Callable[[], None]]:
    def make():
        from lottery.data import make_loader
        from lottery.engine.evaluate import evaluate

        model = build("lenet_300_100", 0)
        loader = make_loader(bundle().splits.test, batch, train=False, seed=0, augment=False)
        return lambda: evaluate(model, loader)

    return make


def part_options(args) -> str:
    out = []
    it = args.lenet_iters
    res = interleaved({
        "default": engine_run("lenet_300_100", "dense", it),
        "SGD foreach": engine_run("lenet_300_100", "dense", it, foreach=True),
        "torch.compile": engine_run("lenet_300_100", "dense", it, compile_model=True),
        "CS default": engine_run("lenet_300_100", "cs", it),
        "CS torch.compile": engine_run("lenet_300_100", "cs", it, compile_model=True),
    }, args.repeats)
    out.append(table(f"Fast paths, LeNet-300-100 ({it} it; compilation not timed)", res, "default", per=f"{it} it"))
    it = args.conv_iters
    res = interleaved({
        "default": engine_run("conv2", "dense", it),
        "channels_last": engine_run("conv2", "dense", it, channels_last=True),
        "torch.compile": engine_run("conv2", "dense", it, compile_model=True),
    }, args.repeats)
    out.append(table(f"Fast paths, Conv-2 ({it} it; compilation not timed)", res, "default", per=f"{it} it"))
    res = interleaved({"eval batch 1000 (the default)": eval_run(1000), "eval batch 128": eval_run(128)}, args.repeats)
    out.append(table("Evaluation of the 10,000 test images, LeNet-300-100", res, "eval batch 1000 (the default)",
                     per="evaluation"))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- workers
def part_workers(args) -> str:
    from lottery.experiment import RunOptions
    from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
    from lottery.sweep import make_spec, run_sweep

    rows = []
    configs = (("1 worker x 2 threads", 1, 2), ("2 workers x 1 thread", 2, 1))
    times: dict[str, list[float]] = {c[0]: [] for c in configs}
    n_jobs = 4
    for r in range(args.sweep_repeats):
        order = configs if r % 2 == 0 else configs[::-1]
        for label, workers, threads in order:
            with tempfile.TemporaryDirectory(prefix="lottery-speed-") as tmp:
                specs = [make_spec("train", seed=s, data=DataHparams(dataset="fashion-mnist"),
                                   model=ModelHparams(model="lenet_300_100"),
                                   training=TrainingHparams(training_steps="2ep", lr=0.05)) for s in range(n_jobs)]
                t0 = time.perf_counter()
                result = run_sweep(specs, RunOptions(out=tmp, progress=False), workers=workers,
                                   threads_per_worker=threads, progress=False, log=_quiet)
                times[label].append(time.perf_counter() - t0)
                if result.failures:
                    raise RuntimeError(f"sweep failures: {result.failures}")
    base = statistics.median(times[configs[0][0]])
    rows.append(f"\n### Sweep throughput: {n_jobs} dense LeNet-300-100 trainings of 2 epochs (with evaluation)\n")
    rows.append("| configuration | median wall s | experiments / hour | throughput / 1x2 |")
    rows.append("|---|---|---|---|")
    for label, *_ in configs:
        med = statistics.median(times[label])
        rows.append(f"| {label} | {med:.1f} | {3600 * n_jobs / med:.0f} | {base / med:.2f} |")
    return "\n".join(rows)


# -------------------------------------------------------------------------------------------- memory
_MEMORY_CHILD = r"""
import gc, sys, json
import torch
torch.set_num_threads(1)
sys.path.insert(0, {bench!r})
import speed

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])  # KiB

what, model_name, iters = sys.argv[1], sys.argv[2], int(sys.argv[3])
run = speed.engine_run(model_name, what, iters)()  # data loaded, model, masks and optimizers built
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size
before = status("VmRSS")
run()
print("MEMORY", json.dumps({{"before_kib": before, "peak_kib": status("VmHWM")}}))
"""


def training_memory_mib(what: str, model: str, iters: int) -> tuple[float, float]:
    """(resident MiB once everything is built, growth of the peak during training in MiB), measured in a
    fresh process: the peak is reset after loading (``/proc/self/clear_refs``), so the data loading's own
    peak (decompression) does not hide what training adds."""
    code = _MEMORY_CHILD.format(bench=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", code, what, model, str(iters)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY")][-1]
    d = json.loads(line.split(" ", 1)[1])
    return d["before_kib"] / 1024, (d["peak_kib"] - d["before_kib"]) / 1024


def part_memory(args) -> str:
    rows = ["\n### Memory: growth of the peak resident size during training (fresh process each, MiB)\n",
            "| model | fp32 weights (MiB) | resident before training, dense / CS | training adds, dense | "
            "training adds, CS search | CS - dense |",
            "|---|---|---|---|---|---|"]
    for model, iters in (("lenet_300_100", 200), ("conv2", 20)):
        vals: dict[str, list[tuple[float, float]]] = {"dense": [], "cs": []}
        for _ in range(args.memory_repeats):
            for what in vals:
                vals[what].append(training_memory_mib(what, model, iters))
        base = {k: statistics.median(b for b, _ in v) for k, v in vals.items()}
        grow = {k: statistics.median(g for _, g in v) for k, v in vals.items()}
        params = sum(p.numel() for p in build(model).parameters()) * 4 / 2**20
        rows.append(f"| {model} | {params:.1f} | {base['dense']:.0f} / {base['cs']:.0f} | {grow['dense']:.1f} | "
                    f"{grow['cs']:.1f} | {grow['cs'] - grow['dense']:+.1f} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------- scaling
def part_scaling(args) -> str:
    epoch_iters = len(train_loader())
    rows = [f"\n### Cost against model size (dense training, batch 128, {args.scale_iters} timed iterations, "
            f"epoch = {epoch_iters} it)\n",
            "| model | parameters | median s / iteration | est. s / epoch | time / smallest |", "|---|---|---|---|---|"]
    variants = {"resnet20 w1": ("resnet20", 1), "resnet20 w2": ("resnet20", 2), "resnet20 w4": ("resnet20", 4),
                "conv2": ("conv2", None), "conv4": ("conv4", None), "conv6": ("conv6", None)}

    def make(name, width):
        def factory():
            from lottery.engine.trainer import Trainer

            model = build(name, 0, width)
            return Trainer(model, train_loader(), recipe(args.scale_iters), progress=False, log=_quiet).fit
        return factory

    res = interleaved({k: make(*v) for k, v in variants.items()}, max(3, args.repeats // 2))
    base = min(r["median_s"] for r in res.values())
    for k, (name, width) in variants.items():
        per_it = res[k]["median_s"] / args.scale_iters
        params = sum(p.numel() for p in build(name, 0, width).parameters())
        rows.append(f"| {k} | {params:,} | {per_it:.4f} | {per_it * epoch_iters:.0f} | {res[k]['median_s'] / base:.2f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the timed runs (not the sweep part)")
    ap.add_argument("--lenet-iters", type=int, default=200)
    ap.add_argument("--conv-iters", type=int, default=20)
    ap.add_argument("--scale-iters", type=int, default=10)
    ap.add_argument("--sweep-repeats", type=int, default=3)
    ap.add_argument("--memory-repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the tables to this JSON file")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        sys.exit(f"unknown part(s) {bad}; choose from {', '.join(PARTS)}")
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; torch threads {args.threads}; repeats {args.repeats}")
    print(f"command: python benchmarks/speed.py {' '.join(sys.argv[1:])}")
    tables = {}
    for p in parts:
        t0 = time.perf_counter()
        tables[p] = globals()[f"part_{p}"](args)
        print(tables[p])
        print(f"\n({p}: {time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(tables, indent=1))


if __name__ == "__main__":
    main()
