"""Data-parallel training with 2 CPU processes (gloo): the ranks end with identical weights and masks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from conftest import TensorBatches, blobs, tiny_mlp
from lottery import masking
from lottery.distributed import ShardedLoader
from lottery.engine import Trainer
from lottery.hparams import TrainingHparams
from lottery.io import save_tensors
from lottery.masks import Mask
from lottery.methods.cs import make_search_optimizers, search_round_callbacks, CSHparams

HP = TrainingHparams(training_steps="3ep", batch_size=32, lr=0.1, momentum=0.9, weight_decay=1e-4)


def _worker(rank: int, world: int, init_file: str, out_dir: str, kind: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x, y = blobs()
    loader = ShardedLoader(TensorBatches(x, y, 32, seed=0))
    model = tiny_mlp()
    if kind == "hard":
        g = torch.Generator().manual_seed(0)
        mask = Mask({n: torch.rand(p.shape, generator=g) > 0.5 for n, p in masking.prunable_weights(model).items()})
        masking.attach_hard_mask(model, mask)
        trainer = Trainer(model, loader, HP, progress=False, log=lambda m: None)
    else:
        cs = CSHparams(s0=0.0, lam=1e-4, mask_optimizer="sgd", temperature_schedule="epoch")
        masking.attach_soft_mask(model, list(masking.prunable_weights(model)), s0=0.0)
        trainer = Trainer(model, loader, HP, optimizers=make_search_optimizers(model, HP, cs),
                          callbacks=search_round_callbacks(cs, 0), progress=False, log=lambda m: None)
    trainer.fit()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    mask = masking.current_mask(model) if kind == "hard" else masking.hard_mask_from_logits(model)
    state.update({f"__mask__/{k}": v.to(torch.uint8) for k, v in mask.items()})
    save_file(state, os.path.join(out_dir, f"rank{rank}.safetensors"))  # not lottery.io: every rank writes here
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_two_gloo_ranks_end_identical(tmp_path, kind):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), kind), nprocs=2, join=True)
    a, b = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("__mask__/") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Training really happened and used both shards: the weights moved from their initialisation.
    init = tiny_mlp().state_dict()
    assert not torch.equal(a["0.weight"], init["0.weight"])


def test_torchrun_cli_rank0_writes(tmp_path):
    """`torchrun --nproc-per-node 2 -m lottery search cs` runs, and the result is written once."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "lottery", "search", "cs", "--dataset", "synthetic", "--synthetic-shape", "1,8,8",
           "--synthetic-train-size", "400", "--synthetic-test-size", "100", "--val-size", "50",
           "--batch-size", "32", "--epochs", "2", "--rounds", "2", "--rewind", "2it", "--no-dense",
           "--threads", "1", "--out", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (folder,) = (tmp_path / "runs").iterdir()
    results = json.loads((folder / "results.json").read_text())
    assert results["method"] == "cs" and 0 < results["density"] <= 1
    assert proc.stdout.count("dense vs ticket") == 1  # only rank 0 prints the table
    ticket = load_file(folder / "ticket" / "model.safetensors")
    mask = Mask.load(folder / "mask.safetensors")
    for name, m in mask.items():
        assert torch.all(ticket[name][~m] == 0)
