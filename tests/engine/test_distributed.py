"""Data-parallel training with 2 CPU processes (gloo): the ranks end with identical weights and masks, and
hard-pruned weights are exactly 0 on every rank after every step (SGD with momentum and weight decay, Adam)."""

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
from lottery.engine import Callback, Trainer
from lottery.hparams import TrainingHparams
from lottery.io import save_tensors
from lottery.masks import Mask
from lottery.methods.cs import EnforceMaskCallback, make_search_optimizers, search_round_callbacks, CSHparams

HP = TrainingHparams(training_steps="3ep", batch_size=32, lr=0.1, momentum=0.9, weight_decay=1e-4)
ADAM = HP.replace(optimizer="adam", lr=0.01, momentum=0.0, weight_decay=1e-3)


class PrunedAreZero(Callback):
    """After every step (after the pipelines' EnforceMaskCallback): the largest, over layers, sum of |weight| at
    pruned positions (0 exactly when every pruned weight is 0)."""

    def __init__(self, mask: Mask):
        self.mask, self.steps = mask, []

    def on_step_end(self, trainer) -> None:
        params = dict(trainer.model.named_parameters())
        worst = max(float(params[n].detach()[~m].abs().sum()) for n, m in self.mask.items())
        self.steps.append([trainer.iteration, worst])


def _worker(rank: int, world: int, init_file: str, out_dir: str, kind: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x, y = blobs()
    loader = ShardedLoader(TensorBatches(x, y, 32, seed=0))
    model = tiny_mlp()
    check = None
    if kind == "hard":
        g = torch.Generator().manual_seed(0)
        mask = Mask({n: torch.rand(p.shape, generator=g) > 0.5 for n, p in masking.prunable_weights(model).items()})
        # Adam first, on a copy (one process start for both optimizers), then SGD with momentum and weight decay.
        adam_model = tiny_mlp()
        masking.attach_hard_mask(adam_model, mask)
        adam_check = PrunedAreZero(mask)
        Trainer(adam_model, loader, ADAM, callbacks=[EnforceMaskCallback(), adam_check], progress=False,
                log=lambda m: None).fit()
        adam_state = {f"__adam__/{k}": v.contiguous() for k, v in adam_model.state_dict().items()}
        masking.attach_hard_mask(model, mask)
        check = PrunedAreZero(mask)
        trainer = Trainer(model, loader, HP, callbacks=[EnforceMaskCallback(), check], progress=False, log=lambda m: None)
    else:
        cs = CSHparams(s0=0.0, lam=1e-4, mask_optimizer="sgd", temperature_schedule="epoch")
        masking.attach_soft_mask(model, list(masking.prunable_weights(model)), s0=0.0)
        trainer = Trainer(model, loader, HP, optimizers=make_search_optimizers(model, HP, cs),
                          callbacks=search_round_callbacks(cs, 0), progress=False, log=lambda m: None)
    trainer.fit()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if check is not None:
        with open(os.path.join(out_dir, f"zeros{rank}.json"), "w") as f:
            json.dump({"sgd": check.steps, "adam": adam_check.steps, "per_epoch": len(loader)}, f)
        state.update(adam_state)
    mask = masking.current_mask(model) if check is not None else masking.hard_mask_from_logits(model)
    state.update({f"__mask__/{k}": v.to(torch.uint8) for k, v in mask.items()})
    save_file(state, os.path.join(out_dir, f"rank{rank}.safetensors"))  # not lottery.io: every rank writes here
    dist.barrier()
    dist.destroy_process_group()
    # End the process here, without the interpreter's exit-time teardown. A rank sometimes aborted after
    # this function had returned ("terminate called without an active exception", SIGABRT; faulthandler
    # showed no Python frame: C++ destructors at exit, after everything was written): 2026-12-04, 5 of
    # about 300 two-rank runs, with the barrier above; with this exit, 0 of 250. `lottery` under torchrun (the
    # product's path, test_torchrun_cli_rank0_writes's command) did not abort in 160 runs.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_two_gloo_ranks_end_identical(tmp_path, kind):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), kind), nprocs=2, join=True)
    a, b = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("__mask__/") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if kind == "hard":
        for rank in (0, 1):
            record = json.loads((tmp_path / f"zeros{rank}.json").read_text())
            for opt in ("sgd", "adam"):
                steps = record[opt]
                assert [s[0] for s in steps] == list(range(1, 3 * record["per_epoch"] + 1)), "a check after every step"
                assert [s for s in steps if s[1] != 0.0] == [], f"rank {rank}, {opt}: pruned weights not 0 after these steps"
        mask = {k[len("__mask__/"):]: v.bool() for k, v in a.items() if k.startswith("__mask__/")}
        for name, m in mask.items():
            for prefix in ("", "__adam__/"):
                assert not bool(a[prefix + name][~m].any()), f"{prefix}{name}: a pruned weight is not 0 at the end"
        assert not torch.equal(a["__adam__/0.weight"], a["0.weight"])  # two different trainings
    # Training really happened and used both shards: the weights moved from their initialisation.
    init = tiny_mlp().state_dict()
    assert not torch.equal(a["0.weight"], init["0.weight"])


def test_torchrun_cli_rank0_writes(tmp_path):
    """`torchrun --nproc-per-node 2 -m lottery search cs` runs, and the result is written once. (--standalone: the
    rendezvous takes a free port, so two test runs on one machine never collide.)"""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
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
