"""What every loader shares: the per-epoch seed and the normalisation of a uint8 batch.

Both the in-memory loader (``lottery.data.loader``) and the worker-based image-folder loader
(``lottery.data.imagefolder``) use these; they live here so that neither loader imports the other
(``loader.make_loader`` picks between them and is the only one that knows both).
"""

from __future__ import annotations

import numpy as np
import torch

from lottery.errors import ConfigError


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed for ``(seed, epoch)``.

    Hashing through ``SeedSequence`` keeps nearby pairs (seed 1 epoch 0, seed 0 epoch 1) unrelated,
    which ``seed + epoch`` would not.
    """
    state = np.random.SeedSequence([int(seed) % 2**64, int(epoch) % 2**64]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class Normalizer:
    """``(x / 255 - mean) / std`` folded into one multiply and one subtract on a float batch."""

    def __init__(self, mean, std, device: torch.device):
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        if torch.any(std_t <= 0):
            raise ConfigError(f"normalisation std must be positive, got {tuple(std)}")
        self.scale = (1.0 / (255.0 * std_t)).to(device)
        self.shift = (mean_t / std_t).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mul(x, self.scale).sub_(self.shift)  # uint8 * float32 promotes to float32
