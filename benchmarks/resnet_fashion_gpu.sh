#!/bin/bash
# Issue 21, point 4: the ResNet-20 / Fashion-MNIST comparison at FULL width (16/32/64 channels) on one lent
# GPU, planned as ONE device call of at most 10 minutes (a session has about 15 minutes of device time, the
# machine's start included, so one call plus room to rerun it once).
#
# What it runs: the parts of benchmarks/resnet_fashion.py that answer claims (a) and (b), all side by side
# as separate processes on the one GPU (they are launch-bound at this size, so they share it well):
# the dense network's instability at k = 0, 100 it, 1, 2, 5 epochs (3 seeds), IMP k = 0 and IMP-R
# rewinding to 1 epoch (3 seeds, 12 levels). k is fixed at 1 epoch (the CPU run's choice at width 0.25)
# because one call cannot wait for the instability to choose it; the report shows the full-width
# instability beside it, so whether 1 epoch is stable at full width is read off the same output.
# After BUDGET seconds the driver and its workers are stopped (every run resumes from its last epoch),
# and what finished comes back: the report, the figure, the driver's log (per-epoch seconds, to size
# the next call) and the run folders without their weights (JSON, CSV and Markdown only: the weights of
# 9 runs at full width are over the device tool's 64 MiB), and a timing of one training step with and
# without the per-step loss read-back (step.json). 8 files in all: the device tool's limit.
#
# From the repository root, here (the data travels with the call: no network there; as xz, 26 MB, because
# as gzip it is 31 MB):
#   mkdir -p .data/fashion-mnist-xz
#   for f in /usr/share/datasets/fashion-mnist/*.gz; do zcat $f | xz -9e > .data/fashion-mnist-xz/$(basename $f .gz).xz; done
# The tracked tree (41 MB on 2026-12-04) plus the data is over the tool's 64 MiB, so take the CS runs with
# the paper's recipe (7.6 MB; not used here) out of what travels for the call, and put them back after:
#   git rm -r -q --cached benchmarks/out/resnet_fashion_cs_paper
#   sed -i 's|^!benchmarks/out/resnet_fashion_cs_paper/$|#&|' .gitignore
#   device run:  command="BUDGET=420 bash benchmarks/resnet_fashion_gpu.sh", carry=[".data"], timeout_s=560
#   git checkout .gitignore && git add benchmarks/out/resnet_fashion_cs_paper
# (measured on an H200, 2026-12-04: 9 processes at 15.7 s an epoch each, 0.54 epochs a second in all;
# the whole comparison is about 1,690 epochs, some 52 minutes: RESULTS.md.)
# The files come back under the call's files_at; unpack the run folders with
#   tar xf <files_at>/resnet_fashion_w1.tar      (into benchmarks/out/resnet_fashion_w1)
# and read them with: .venv/bin/python benchmarks/resnet_fashion.py report --width 1
#
# Settings (environment): BUDGET seconds of training (default 480), WORKERS (default 9: one per job),
# DEVICE (default cuda; cpu to try the script out here, with PYTHON=.venv/bin/python), WIDTH (default 1),
# SEEDS (default 0,1,2), PARTS, REWIND, PYTHON (default python3, the one holding torch there), OUT (the
# folder for what comes back; the device tool sets it).
set -u
BUDGET=${BUDGET:-480}
WORKERS=${WORKERS:-9}
DEVICE=${DEVICE:-cuda}
WIDTH=${WIDTH:-1}
PARTS=${PARTS:-stability,imp0,impr}
REWIND=${REWIND:-1ep}
SEEDS=${SEEDS:-0,1,2}
PYTHON=${PYTHON:-python3}
RETURN=${OUT:?set OUT to the folder for what comes back (the device tool sets it)}
RUNS=benchmarks/out/resnet_fashion_w${WIDTH}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LOTTERY_DATA=$PWD/.data

mkdir -p "$RETURN"
# the data back as the gzipped IDX files the reader takes (their content is checked against its digests)
if [ -d .data/fashion-mnist-xz ] && [ ! -d .data/fashion-mnist ]; then
  "$PYTHON" -c "
import gzip, lzma, pathlib
src, dst = pathlib.Path('.data/fashion-mnist-xz'), pathlib.Path('.data/fashion-mnist')
dst.mkdir()
for f in sorted(src.glob('*.xz')):
    (dst / (f.stem + '.gz')).write_bytes(gzip.compress(lzma.decompress(f.read_bytes()), compresslevel=1))
" || { echo "could not unpack .data/fashion-mnist-xz" >&2; exit 1; }
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } > "$RETURN/machine.txt"
# A smoke run first (2 iterations of the preset at this width, on synthetic data of Fashion-MNIST's shape):
# the machine's torch is not the one pinned here, and a call that cannot train should end in seconds
# with the reason, not after the whole budget.
if ! timeout 120 "$PYTHON" -m lottery train --preset fashion_resnet20 --width "$WIDTH" --device "$DEVICE" \
    --dataset synthetic --synthetic-shape 1,28,28 --synthetic-train-size 256 --synthetic-test-size 128 \
    --val-size 0 --training-steps 2it --no-progress --out "$(mktemp -d)" > "$RETURN/smoke.log" 2>&1; then
  echo "smoke run failed (no comparison run); its log:"; cat "$RETURN/smoke.log"; exit 1
fi
# How much the trainer's old per-step loss read-back cost (Trainer.defer_loss_check; RESULTS.md), and
# how fast the seeds train as one stack (grouped convolutions: one launch per layer for 3 or 9 networks,
# where 9 processes each launch their own; plain and as a CUDA graph): about 30 s, on the GPU only (on the
# CPU it is meaningless). The stack of 9 adds its lines to step.log (the files that come back are at the
# tool's limit).
if [ "$DEVICE" = cuda ]; then
  timeout 120 "$PYTHON" benchmarks/resnet_gpu_step.py --device cuda --width "$WIDTH" \
      --modes eager,sync,stacked,stacked_graph --stack 3 \
      --json "$RETURN/step.json" > "$RETURN/step.log" 2>&1 || echo "step timing failed (see step.log)" >> "$RETURN/step.log"
  timeout 90 "$PYTHON" benchmarks/resnet_gpu_step.py --device cuda --width "$WIDTH" --modes stacked,stacked_graph \
      --stack 9 >> "$RETURN/step.log" 2>&1 || echo "stack-9 timing failed" >> "$RETURN/step.log"
fi
# timeout signals the driver's whole process group, so its workers stop too; each resumes from its last epoch.
# The log is opened for appending: processes that outlive the driver by a moment (multiprocessing's
# resource tracker) would otherwise write over the status line below.
: > "$RETURN/driver.log"
timeout -s TERM -k 20 "$BUDGET" "$PYTHON" benchmarks/resnet_fashion.py run --width "$WIDTH" --device "$DEVICE" \
    --workers "$WORKERS" --seeds "$SEEDS" --parts "$PARTS" --rewind "$REWIND" --out "$RUNS" >> "$RETURN/driver.log" 2>&1
echo "driver exit status $? (124: stopped after ${BUDGET} s, as planned)" >> "$RETURN/driver.log"
sleep 2
"$PYTHON" benchmarks/resnet_fashion.py report --width "$WIDTH" --seeds "$SEEDS" --rewind "$REWIND" --out "$RUNS" \
    --figure "$RETURN/accuracy_vs_density.png" > "$RETURN/report.md" 2>&1
tar cf "$RETURN/resnet_fashion_w${WIDTH}.tar" --exclude='*.safetensors' --exclude='.lock' "$RUNS"
ls -la "$RETURN"
tail -n 5 "$RETURN/report.md"
