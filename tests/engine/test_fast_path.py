"""The engine's fast paths compute what a plain PyTorch loop computes.

benchmarks/speed.py measures the engine (whole-batch in-memory loader, hard masks by gradient hook)
against a straightforward ``DataLoader`` + SGD loop; these tests guard that the faster path is the
same training: the same loss at every step, to float32 rounding (we ask for 1e-6 relative; in
practice the trajectories are bit-identical because the operations are the same).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import tiny_mlp
from lottery import masking
from lottery.data import BatchLoader
from lottery.data.base import ArrayDataset
from lottery.engine.callbacks import Callback
from lottery.engine.trainer import Trainer
from lottery.hparams import TrainingHparams
from lottery.masks import Mask


class _Losses(Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_step_end(self, trainer) -> None:
        self.losses.append(float(trainer.last_loss))


def _dataset(n: int = 300, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 4, 5), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 4, (n,), generator=g)
    return ArrayDataset(images, labels, num_classes=4, mean=(0.4,), std=(0.3,))


def _plain_run(model, loader, epochs: int, lr: float, momentum: float, mask: Mask | None) -> list[float]:
    """The textbook loop over the very same batches; a mask is applied by zeroing the gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    params = dict(model.named_parameters())
    losses = []
    torch.manual_seed(7)  # dropout draws: the same stream as the engine's run
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(model(x.flatten(1)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if mask is not None:
                for name, m in mask.items():
                    params[name].grad.mul_(m)
            opt.step()
            losses.append(float(loss.detach()))
    return losses


class _Flat(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.flatten(1))


def _engine_run(model, loader, epochs: int, lr: float, momentum: float) -> list[float]:
    hp = TrainingHparams(training_steps=f"{epochs}ep", batch_size=loader.batch_size, lr=lr, momentum=momentum,
                         eval_every=f"{epochs}ep")
    rec = _Losses()
    torch.manual_seed(7)  # dropout draws
    Trainer(model, loader, hp, callbacks=[rec], progress=False, log=lambda _m: None).fit()
    return rec.losses


def _close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b) and len(a) > 0
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= 1e-6 * max(1.0, abs(y)), f"step {i}: engine {x!r} != plain loop {y!r}"


def test_engine_with_the_batch_loader_follows_the_plain_loop():
    ds = _dataset()
    loader = BatchLoader(ds, 32, shuffle=True, seed=3)
    engine = _Flat(tiny_mlp(seed=1))
    plain = _Flat(tiny_mlp(seed=1))
    got = _engine_run(engine, loader, epochs=3, lr=0.1, momentum=0.9)
    want = _plain_run(plain.inner, BatchLoader(ds, 32, shuffle=True, seed=3), 3, 0.1, 0.9, None)
    _close(got, want)
    assert want[-1] < want[0], "the run trained"
    for a, b in zip(engine.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_hard_masked_training_follows_the_plain_loop_with_masked_gradients():
    ds = _dataset(seed=1)
    inner = tiny_mlp(seed=2)
    g = torch.Generator().manual_seed(5)
    mask = Mask({n: torch.rand(p.shape, generator=g) < 0.3 for n, p in masking.prunable_weights(inner).items()})
    engine = _Flat(tiny_mlp(seed=2))
    masking.attach_hard_mask(engine.inner, mask)
    plain = tiny_mlp(seed=2)
    with torch.no_grad():
        for name, m in mask.items():
            dict(plain.named_parameters())[name].mul_(m)
    got = _engine_run(engine, BatchLoader(ds, 25, shuffle=True, seed=4), epochs=2, lr=0.05, momentum=0.9)
    want = _plain_run(plain, BatchLoader(ds, 25, shuffle=True, seed=4), 2, 0.05, 0.9, mask)
    _close(got, want)
    final = masking.current_mask(engine.inner)
    assert final == mask, "pruned weights stayed exactly zero"
