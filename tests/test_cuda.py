"""The CUDA path: masks, CS and IMP searches, checkpoints, export and latency on a GPU.

Skipped where PyTorch sees no CUDA GPU (CI has none); run on a GPU machine with
``python -m pytest tests/test_cuda.py``. Each test compares the GPU against the CPU or checks that what a
GPU run writes loads on a machine without one, because those are the ways a CUDA-only bug would show.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lottery import masking
from lottery.experiment import RunOptions
from lottery.export import export_model, max_output_difference
from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
from lottery.io import load_tensors
from lottery.latency import LatencySettings, measure_latency
from lottery.masks import Mask
from lottery.methods.cs import CSHparams
from lottery.methods.imp import IMPHparams
from lottery.models.registry import build_model
from lottery.pipelines.cs import CSJob, run_cs
from lottery.pipelines.imp import IMPJob, run_imp
from lottery.pipelines.structured import load_run_network

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DATA = DataHparams(dataset="synthetic", val_size=64, synthetic_shape=(1, 16, 16), synthetic_classes=4,
                   synthetic_train_size=320, synthetic_test_size=128)
TRAIN = TrainingHparams(training_steps="3ep", batch_size=32, lr=0.05, momentum=0.9, weight_decay=1e-4)
MODEL = ModelHparams("conv2", width=0.25)


def _net():
    return build_model("conv2", input_shape=(1, 16, 16), num_classes=4, width=0.25)


def _options(out: Path, device: str) -> RunOptions:
    return RunOptions(out=out, progress=False, device=device, log=lambda m: None)


def test_soft_mask_forward_backward_match_cpu():
    torch.manual_seed(0)
    cpu = _net()
    gpu = _net()
    gpu.load_state_dict(cpu.state_dict())
    for m in (cpu, gpu):
        masking.attach_soft_mask(m, s0=0.5)
        masking.set_temperature(m, 7.0)
    gpu = gpu.cuda()
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 4, (8,))
    losses = []
    for m, dev in ((cpu, "cpu"), (gpu, "cuda")):
        out = m(x.to(dev))
        loss = torch.nn.functional.cross_entropy(out, y.to(dev)) + 1e-3 * masking.soft_mask_penalty(m)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)
    grads_cpu = {n: p.grad for n, p in masking.mask_logits(cpu).items()}
    for n, p in masking.mask_logits(gpu).items():
        assert p.device.type == "cuda"
        torch.testing.assert_close(p.grad.cpu(), grads_cpu[n], rtol=1e-3, atol=1e-6)


def test_training_killed_on_cuda_resumes_on_cuda(tmp_path):
    """A resumed GPU run steps with momentum loaded from its checkpoint: it must sit on the GPU too (it once
    stayed on the CPU and every resumed GPU run failed at its first step), and the run ends where an
    uninterrupted one does (to float tolerance: GPU kernels need not be bit-for-bit deterministic)."""
    from conftest import TensorBatches, blobs, tiny_mlp
    from lottery.engine import Callback, Trainer

    class Crash(Callback):
        def on_step_end(self, trainer):
            if trainer.iteration == 12:
                raise KeyboardInterrupt("simulated kill")

    x, y = blobs()
    hp = TrainingHparams(training_steps="3ep", batch_size=32, lr=0.1, momentum=0.9)

    def run(path, callbacks=()):
        model = tiny_mlp()
        trainer = Trainer(model, TensorBatches(x, y, 32, seed=0), hp, device="cuda", checkpoint_path=path,
                          callbacks=list(callbacks), progress=False, log=lambda m: None)
        trainer.fit()
        return model, trainer

    reference, _ = run(None)
    path = tmp_path / "ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        run(path, [Crash()])
    resumed, trainer = run(path)
    optimizer = trainer.optimizers[0]
    for p in optimizer.param_groups[0]["params"]:
        assert optimizer.state[p]["momentum_buffer"].device == p.device
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-4, atol=1e-5)


def test_a_non_finite_loss_on_cuda_is_caught_by_the_deferred_check(tmp_path):
    """On a GPU the trainer does not read the loss back every step; a NaN is still caught, named by its
    step, before the epoch's checkpoint."""
    from conftest import TensorBatches, blobs, tiny_mlp
    from lottery.engine import Callback, Trainer, load_checkpoint
    from lottery.errors import NumericalError

    class Poison(Callback):
        def extra_loss(self, trainer):
            return torch.tensor(float("nan"), device="cuda") if trainer.iteration == 10 else None

    x, y = blobs()
    hp = TrainingHparams(training_steps="3ep", batch_size=32, lr=0.1, momentum=0.9)
    path = tmp_path / "c.safetensors"
    trainer = Trainer(tiny_mlp(), TensorBatches(x, y, 32, seed=0), hp, device="cuda", checkpoint_path=path,
                      callbacks=[Poison()], progress=False, log=lambda m: None)
    assert trainer.defer_loss_check
    with pytest.raises(NumericalError, match=r"step 1ep2it"):
        trainer.fit()
    assert load_checkpoint(path).info["iteration"] == 8


def test_cs_search_killed_on_cuda_resumes_on_cuda(tmp_path, monkeypatch):
    """The same for a CS search, whose mask logits have an optimizer of their own (the CS callback's)."""
    import lottery.pipelines.cs as cs_pipe
    from lottery.engine import Callback

    class Crash(Callback):
        def on_step_end(self, trainer):
            if trainer.iteration == 11:  # mid epoch 1 of round 0 (8 iterations an epoch), after a checkpoint
                raise KeyboardInterrupt("simulated kill")

    original = cs_pipe.search_round_callbacks
    crashed: list[bool] = []

    def crashing(hp, round_index, *args):
        callbacks = original(hp, round_index, *args)
        if round_index == 0 and not crashed:
            crashed.append(True)
            callbacks.append(Crash())
        return callbacks

    monkeypatch.setattr(cs_pipe, "search_round_callbacks", crashing)
    cs = CSHparams(s0=0.0, lam=5e-6, beta_final=50.0, rounds=2, round_steps="2ep", rewind="1ep")
    job = CSJob(DATA, MODEL, TRAIN, cs, dense_reference=False)
    with pytest.raises(KeyboardInterrupt):
        run_cs(job, _options(tmp_path, "cuda"))
    assert crashed == [True]
    res = run_cs(job, _options(tmp_path, "cuda"))
    assert 0.0 < res["density"] < 1.0


def test_cs_search_on_cuda_writes_a_ticket_that_loads_on_cpu(tmp_path):
    cs = CSHparams(s0=0.0, lam=5e-6, beta_final=50.0, rounds=2, round_steps="2ep", rewind="1ep")
    res = run_cs(CSJob(DATA, MODEL, TRAIN, cs, dense_reference=False), _options(tmp_path, "cuda"))
    assert 0.0 < res["density"] < 1.0
    model, mask, _ = load_run_network(res["run_dir"])
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(m.device.type == "cpu" for m in mask.values())
    # the saved weights are the ticket's: pruned entries exactly zero
    state = load_tensors(Path(res["run_dir"]) / "ticket" / "model.safetensors")
    for name, m in mask.items():
        assert torch.count_nonzero(state[name][~m]) == 0


def test_imp_level_on_cuda_prunes_the_same_fraction_as_on_cpu(tmp_path):
    imp = IMPHparams(levels=1, rate=0.5, rewind="1ep")
    res = {dev: run_imp(IMPJob(DATA, MODEL, TRAIN, imp), _options(tmp_path / dev, dev)) for dev in ("cpu", "cuda")}
    d_cpu = res["cpu"]["levels"][1]["density"]
    d_gpu = res["cuda"]["levels"][1]["density"]
    assert d_gpu == pytest.approx(d_cpu, abs=1e-3) and d_gpu < 0.6


def test_export_of_a_cuda_masked_network_matches_it():
    torch.manual_seed(1)
    model = _net()
    mask = Mask({n: torch.rand_like(p) < 0.3 for n, p in masking.prunable_weights(model).items()})
    model = model.cuda().eval()
    masking.attach_hard_mask(model, {k: v.cuda() for k, v in mask.items()})
    exported = export_model(model, to="csr")
    ref = model.cpu()
    assert max_output_difference(ref, exported.module, (1, 16, 16))["max_abs_diff"] < 1e-4


def test_latency_on_cuda_reports_every_variant():
    model = _net()
    report = measure_latency({"a": model, "b": _net()},
                             (1, 16, 16), LatencySettings(batch_sizes=(1, 8), warmup=2, repeats=5, device="cuda"))
    assert {r["variant"] for r in report["rows"]} == {"a", "b"}
    assert all(r["median_ms"] > 0 for r in report["rows"])
    assert report["machine"]["device"] == torch.cuda.get_device_name(0)  # the GPU, not the CPU, is named


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="2:4 sparse tensor cores need compute capability 8.0 or more")
def test_semi_export_runs_its_2_4_linear_layers_on_sparse_tensor_cores(tmp_path):
    """``load_export(device="cuda", dtype=float16)`` of a semi export converts both 2:4 layers whose sides fit
    the kernels (the 4-class output layer is not masked) and still computes the masked network."""
    from torch import nn

    from lottery.export import load_export, save_export
    from lottery.methods.nm import nm_mask

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 4))
    params = dict(net.named_parameters())
    mask = nm_mask({n: params[n].detach().abs() for n in ("1.weight", "3.weight")}, 2, 4)
    masking.attach_hard_mask(net, mask)
    folder = save_export(tmp_path / "e", export_model(net, mask, "semi", input_shape=(1, 16, 16)))
    lines: list[str] = []
    loaded = load_export(folder, device="cuda", dtype=torch.float16, log=lines.append)
    assert len(lines) == 1
    assert len(loaded.description["semi"]["converted"]) == 2, lines[0]
    x = torch.randn(32, 1, 16, 16)
    with torch.no_grad():
        want = net.eval()(x)
        got = loaded.module(x.cuda().half()).float().cpu()
    assert float((got - want).abs().max()) <= 2e-2 * max(1.0, float(want.abs().max()))
