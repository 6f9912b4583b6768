"""Shared helpers of the benchmark scripts: machine description, parallel jobs, mean and spread."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Sequence


def machine() -> str:
    import torch

    return (f"{platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
            f"torch {torch.__version__}, date {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC")


def read_results(root: Path, pattern: str) -> list[tuple[Path, dict]]:
    """(folder, parsed JSON) of every file under ``root`` matching ``pattern`` (e.g. ``search-cs_*/results.json``),
    sorted by path; unreadable or damaged files are skipped (a run still being written)."""
    out = []
    for path in sorted(root.glob(pattern)) if root.is_dir() else []:
        try:
            out.append((path.parent, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    return out


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_parallel(fn: Callable[..., Any], jobs: Sequence[tuple], workers: int, threads: int = 1) -> list[Any]:
    """Run ``fn(*job)`` for every job in a process pool (each worker with ``threads`` torch threads)."""
    if workers <= 1:
        _init_worker(threads)
        return [fn(*job) for job in jobs]
    import multiprocessing as mp

    results: list[Any] = [None] * len(jobs)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
    return results


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
