"""Throughput of one training epoch: lottery's BatchLoader against a plain torch DataLoader.

Why: the whole-batch loader is the reason small-data experiments are not input-bound; this measures
by how much, on the real Fashion-MNIST training set and, with crop+flip augmentation, on a
CIFAR-shaped synthetic set. The DataLoader side is the straightforward usage: a TensorDataset of
the same uint8 data whose ``__getitem__`` normalises (and augments) one sample, default collation.
Runs are interleaved (A, B, C, A, B, C, ...) so drifting machine load hits all loaders alike; the
median of the repeats is reported.

Usage: python benchmarks/loader_throughput.py [--repeats 5] [--cifar-size 50000] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lottery.data import BatchLoader, load_train_test, make_synthetic


class PerSampleDataset(TensorDataset):
    """TensorDataset of uint8 images that normalises, and optionally crops+flips, one sample at a time."""

    def __init__(self, images, labels, mean, std, augment=False, pad=4):
        super().__init__(images, labels)
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.augment = augment
        self.pad = pad

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        if self.augment:
            h, w = x.shape[1:]
            x = F.pad(x, (self.pad,) * 4)
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = x[:, dy : dy + h, dx : dx + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x.float() / 255 - self.mean) / self.std, y


def time_epoch(make_iter) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for x, y in make_iter():
        n += y.shape[0]
    return time.perf_counter() - t0, n


def bench(dataset, augment: bool, repeats: int, batch_size: int) -> list[tuple[str, float]]:
    batch_loader = BatchLoader(dataset, batch_size, shuffle=True, augment=augment, seed=0)
    per_sample = PerSampleDataset(dataset.images, dataset.labels, dataset.mean, dataset.std, augment=augment)
    loaders = {
        "BatchLoader": batch_loader,
        "DataLoader, 0 workers": DataLoader(per_sample, batch_size=batch_size, shuffle=True, num_workers=0),
        "DataLoader, 2 workers": DataLoader(per_sample, batch_size=batch_size, shuffle=True, num_workers=2),
    }
    times: dict[str, list[float]] = {k: [] for k in loaders}
    time_epoch(lambda: batch_loader)  # warm-up: first-touch allocations
    for r in range(repeats):
        batch_loader.set_epoch(r)
        for name, loader in loaders.items():
            seconds, n = time_epoch(lambda: loader)
            assert n == len(dataset)
            times[name].append(seconds)
    return [(name, len(dataset) / statistics.median(ts)) for name, ts in times.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--cifar-size", type=int, default=50000)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    fmnist, _ = load_train_test("fashion-mnist", progress=False)
    cifar_like, _ = make_synthetic(shape=(3, 32, 32), num_classes=10, train_size=args.cifar_size, test_size=1)
    load_before = os.getloadavg()
    rows = []
    for label, ds, augment in [
        (f"Fashion-MNIST train ({len(fmnist)} x 1x28x28)", fmnist, False),
        (f"CIFAR-shaped synthetic ({len(cifar_like)} x 3x32x32)", cifar_like, True),
    ]:
        results = bench(ds, augment, args.repeats, args.batch_size)
        ours = results[0][1]
        for name, rate in results:
            rows.append((label, "crop+flip" if augment else "none", name, rate, ours / rate))

    print(f"# Loader throughput, one epoch, batch {args.batch_size}, median of {args.repeats} interleaved repeats\n")
    print(f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"- machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}")
    print(f"- torch {torch.__version__}, intra-op threads {torch.get_num_threads()}")
    load_after = os.getloadavg()
    print(f"- load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} (other work on the machine)\n")
    print("| data | augmentation | loader | samples/s | BatchLoader speed-up |")
    print("|---|---|---|---:|---:|")
    for label, aug, name, rate, ratio in rows:
        print(f"| {label} | {aug} | {name} | {rate:,.0f} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
