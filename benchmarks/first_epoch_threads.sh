#!/bin/bash
# The first epoch of one ResNet-20 seed under different torch thread counts (benchmarks/RESULTS.md,
# "The dense line"): the same seed, data order and initial weights, only the order of floating-point
# sums differs. Prints metrics.csv's epoch-1 row for each thread count.
#
#   benchmarks/first_epoch_threads.sh [THREADS ...]          default: 1 2
#   LOTTERY_SRC=/path/to/other/checkout/src benchmarks/first_epoch_threads.sh 1
#       the same with another commit's code (e.g. a `git worktree add` of it), to tell code from machine
#
# Each run trains until its first evaluation (one epoch, about a minute on 1 core) and is then stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
src=${LOTTERY_SRC:-$PWD/src}
threads=("$@"); [ ${#threads[@]} -gt 0 ] || threads=(1 2)
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); code: $src"
for t in "${threads[@]}"; do
  out=$work/t$t
  PYTHONPATH=$src "$py" -m lottery train --preset fashion_resnet20 --seed 0 --threads "$t" --no-progress \
    --out "$out" > "$out.log" 2>&1 &
  pid=$!
  until [ "$(cat "$out"/*/metrics.csv 2>/dev/null | wc -l)" -ge 2 ]; do
    kill -0 $pid 2>/dev/null || { echo "the run with $t threads failed:"; tail -3 "$out.log"; exit 1; }
    sleep 2
  done
  kill $pid; wait $pid 2>/dev/null || true
  echo "threads $t: $(head -1 "$out"/*/metrics.csv)"
  echo "threads $t: $(sed -n 2p "$out"/*/metrics.csv)"
done
