"""Batched evaluation without gradients: loss, top-1 and top-5 accuracy."""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lottery.io import FAULT_STEP_ENV, fault_step


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu") -> dict[str, float]:
    """Mean cross-entropy and top-1/top-5 accuracy (fractions in 0..1) over a whole split.

    Sums are accumulated on the device and read once at the end, so a GPU is not synchronised per batch.
    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.int64, device=device)
    top5 = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    try:
        for x, y in loader:
            if FAULT_STEP_ENV in os.environ:  # crash tests (lottery.io): SIGKILL in the Nth evaluation batch
                fault_step("eval")
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            k = min(5, logits.shape[1])
            topk = logits.topk(k, dim=1).indices
            hits = topk.eq(y[:, None])
            top1 += hits[:, 0].sum()
            top5 += hits.any(dim=1).sum()
            count += y.shape[0]
    finally:
        model.train(was_training)
    # Under data-parallel training each rank evaluated its own shard: add up all ranks' sums.
    from lottery.distributed import all_reduce_sum, is_distributed

    if is_distributed():
        sums = torch.stack([loss_sum, top1.double(), top5.double(), torch.tensor(float(count), dtype=torch.float64, device=device)])
        all_reduce_sum(sums)
        loss_sum, top1, top5, count = sums[0], sums[1].long(), sums[2].long(), int(sums[3].item())
    if count == 0:
        return {"loss": float("nan"), "top1": float("nan"), "top5": float("nan"), "count": 0}
    return {
        "loss": loss_sum.item() / count,
        "top1": top1.item() / count,
        "top5": top5.item() / count,
        "count": count,
    }
