"""Inference latency of several variants of a network, measured side by side.

What makes the numbers comparable: a fixed number of torch threads for the whole measurement (restored
afterwards); ``warmup`` untimed calls per variant first; then ``repeats`` rounds in which every variant
runs once, in an order that rotates from round to round (so slow drifts of a busy machine, frequency
scaling or another process, hit all variants alike); each timing is one forward pass in
``torch.inference_mode`` (CUDA: synchronised before and after); the statistic is the median, with the
25th and 75th percentiles for spread. Every variant runs in the same ``dtype`` (float32 unless asked:
the 2:4 sparse kernels of a ``semi`` export take float16 or bfloat16, and a dense baseline in float32
beside them would credit the sparsity with the half precision's speed-up). Speed-ups are ``median(baseline) / median(variant)`` at the same
batch size, and time saved is ``1 - median(variant) / median(baseline)``.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from lottery.errors import ConfigError

__all__ = ["DTYPES", "LatencySettings", "format_latency_table", "measure_latency", "fixed_threads"]

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class LatencySettings:
    batch_sizes: tuple[int, ...] = (1, 64)
    warmup: int = 10
    repeats: int = 50
    threads: int = 1
    device: str = "cpu"
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ConfigError(f"batch sizes must be positive, got {self.batch_sizes}")
        if self.warmup < 0 or self.repeats < 1 or self.threads < 1:
            raise ConfigError(f"need warmup >= 0, repeats >= 1 and threads >= 1, got {self.warmup}, "
                              f"{self.repeats}, {self.threads}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"latency dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@contextlib.contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _placed(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``t`` is on ``device`` (``cuda`` matches any GPU index) in ``dtype``."""
    same_device = t.device.type == device.type and (device.index is None or t.device.index == device.index)
    return same_device and t.dtype == dtype


def measure_latency(
    variants: Mapping[str, nn.Module | Callable[[torch.Tensor], Any]],
    input_shape: Sequence[int],
    settings: LatencySettings = LatencySettings(),
    *,
    baseline: str | None = None,
) -> dict[str, Any]:
    """Time every variant's forward pass at each batch size; returns a JSON-ready report.

    ``variants``: name -> module (put in eval mode and moved to the device and dtype unless all its
    parameters are there already: a module prepared for the device, e.g. with semi-structured weights, is
    left as it is) or callable (it gets inputs of the settings' dtype). ``baseline``:
    the variant the others are compared with (default: the first). The report holds ``settings``,
    ``machine``, ``rows`` (one per batch size and variant: median, p25, p75 in ms and the number of
    timings) and ``speedup`` / ``time_saved`` (batch size as a string -> variant -> ratio).
    """
    if not variants:
        raise ConfigError("nothing to time: no variants given")
    names = list(variants)
    baseline = baseline or names[0]
    if baseline not in variants:
        raise ConfigError(f"baseline {baseline!r} is not one of the variants {names}")
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("latency on cuda was asked for but no CUDA GPU is visible to PyTorch")
    dtype = getattr(torch, settings.dtype)
    fns: dict[str, Callable[[torch.Tensor], Any]] = {}
    for name, v in variants.items():
        if isinstance(v, nn.Module):
            if not all(_placed(p, device, dtype) for p in v.parameters()):
                v = v.to(device=device, dtype=dtype)
            v = v.eval()
        fns[name] = v
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    rows: list[dict[str, Any]] = []
    with fixed_threads(settings.threads), torch.inference_mode():
        for batch in settings.batch_sizes:
            g = torch.Generator().manual_seed(settings.seed)
            x = torch.randn(int(batch), *input_shape, generator=g).to(device=device, dtype=dtype)
            for _ in range(settings.warmup):
                for name in names:
                    fns[name](x)
            sync()
            times: dict[str, list[float]] = {n: [] for n in names}
            for r in range(settings.repeats):
                for j in range(len(names)):
                    name = names[(r + j) % len(names)]  # rotate the order from round to round
                    sync()
                    t0 = time.perf_counter()
                    fns[name](x)
                    sync()
                    times[name].append(time.perf_counter() - t0)
            for name in names:
                ts = [1000.0 * t for t in times[name]]
                rows.append({"batch": int(batch), "variant": name, "median_ms": statistics.median(ts),
                             "p25_ms": _percentile(ts, 0.25), "p75_ms": _percentile(ts, 0.75), "timings": len(ts)})
    speedup: dict[str, dict[str, float]] = {}
    saved: dict[str, dict[str, float]] = {}
    for batch in settings.batch_sizes:
        med = {r["variant"]: r["median_ms"] for r in rows if r["batch"] == batch}
        speedup[str(batch)] = {n: med[baseline] / med[n] for n in names}
        saved[str(batch)] = {n: 1.0 - med[n] / med[baseline] for n in names}
    return {
        "settings": {**asdict(settings), "batch_sizes": list(settings.batch_sizes)},
        "baseline": baseline,
        "input_shape": list(input_shape),
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"},
        "rows": rows,
        "speedup": speedup,
        "time_saved": saved,
    }


def format_latency_table(report: Mapping[str, Any], markdown: bool = True) -> str:
    """One line per batch size and variant: median (p25-p75) ms, speed-up and time saved vs the baseline.

    A variant with a note in ``report["notes"]`` (e.g. a ``semi`` export that runs as the dense masked
    network here) is marked ``*`` and its note printed under the table."""
    s = report["settings"]
    head = (f"latency on {s['device']} ({report['machine']['device']}), {s.get('dtype', 'float32')}, "
            f"{s['threads']} thread(s), {s['warmup']} warm-up + {s['repeats']} interleaved timings per variant, "
            f"medians; baseline: {report['baseline']}")
    notes = report.get("notes") or {}
    cols = ["batch", "variant", "median ms", "p25-p75 ms", "speed-up", "time saved"]
    cost = report.get("cost") or {}
    base_flops = (cost.get(report["baseline"]) or {}).get("flops_sparse")
    if cost:
        cols += ["FLOPs/example", "speed-up (FLOPs)", "of it reached"]
    lines = []
    for r in report["rows"]:
        b = str(r["batch"])
        speedup = report['speedup'][b][r['variant']]
        line = [b, r["variant"] + ("*" if r["variant"] in notes else ""), f"{r['median_ms']:.3f}", f"{r['p25_ms']:.3f}-{r['p75_ms']:.3f}",
                f"{speedup:.2f}x", f"{100 * report['time_saved'][b][r['variant']]:.1f}%"]
        if cost:
            flops = (cost.get(r["variant"]) or {}).get("flops_sparse")
            theoretical = base_flops / flops if flops and base_flops else None
            line += [f"{flops:,}" if flops is not None else "-",
                     f"{theoretical:.2f}x" if theoretical else "-",
                     f"{100 * speedup / theoretical:.0f}%" if theoretical else "-"]
        lines.append(line)
    if markdown:
        out = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
    else:
        widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]
        fmt = "  ".join("{:<%d}" % w for w in widths)
        out = [head, fmt.format(*cols)] + [fmt.format(*line) for line in lines]
    if notes:
        out += [""] + [f"* {name}: {note}" for name, note in notes.items()]
    return "\n".join(out)
