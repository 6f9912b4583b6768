"""Shared helpers of the benchmark scripts: machine description, parallel jobs, mean and spread."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable, Sequence


def machine() -> str:
    import torch

    return (f"{platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
            f"torch {torch.__version__}, date {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC")


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
