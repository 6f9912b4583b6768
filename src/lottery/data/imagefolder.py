"""ImageNet-style folders (``root/{train,val}/<class>/<image>``), decoded lazily by worker processes.

ImageNet does not fit in memory as uint8, so unlike the other readers this one keeps only the file
list and decodes per sample, in ``DataLoader`` workers. Each sample's random crop is drawn from a
generator seeded by (epoch seed, sample index), so results do not depend on how many workers ran or
which worker got which sample.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from lottery.data.batching import Normalizer, epoch_seed
from lottery.errors import ConfigError, DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _list_images(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(
            e.path for e in it if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
        )


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """A (left, top, right, bottom) box covering a random area fraction and aspect ratio.

    The Inception-style crop: ten tries to fit a window of the drawn shape, otherwise the largest
    centred window whose aspect ratio is within ``ratio``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class ImageFolderDataset(torch.utils.data.Dataset):
    """File paths and labels of one split; ``__getitem__`` decodes and transforms one image.

    Keys are ``index`` (evaluation transform) or ``(index, augment, sample_seed)`` as produced by
    ``ImageFolderLoader``. Training transform: random resized crop to ``crop_size`` plus flip;
    evaluation: shorter side to ``resize_size``, centre crop ``crop_size``. Returns uint8 C x H x W;
    normalisation happens per batch in the loader.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        *,
        crop_size: int = 224,
        resize_size: int = 256,
        scale: tuple[float, float] = (0.08, 1.0),
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        name: str = "imagenet",
    ):
        if crop_size < 1 or resize_size < crop_size:
            raise ConfigError(f"need 1 <= crop_size <= resize_size, got crop {crop_size}, resize {resize_size}")
        self.samples = list(samples)
        self.classes = list(classes)
        self.crop_size = int(crop_size)
        self.resize_size = int(resize_size)
        self.scale = scale
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.name = name

    @classmethod
    def scan(cls, folder: str | os.PathLike, classes: Sequence[str] | None = None, **kwargs) -> "ImageFolderDataset":
        """List ``folder/<class>/<image>``; with ``classes`` given (the training split's), reuse its labels."""
        folder = Path(folder)
        try:
            found = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
        except OSError as e:
            raise DataError(f"cannot list {folder}: {e.strerror or e}") from None
        if classes is None:
            classes = found
        index = {c: i for i, c in enumerate(classes)}
        unknown = [c for c in found if c not in index]
        if unknown:
            raise DataError(
                f"{folder} has class folders missing from the training split: {', '.join(unknown[:5])}"
                f"{' ...' if len(unknown) > 5 else ''}; both splits must use the same class folder names"
            )
        samples = []
        for c in found:
            try:
                samples += [(p, index[c]) for p in _list_images(folder / c)]
            except OSError as e:
                raise DataError(f"cannot list {folder / c}: {e.strerror or e}") from None
        if not samples:
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(f"no images in {folder}: expected {folder}/<class>/<image> with one of {exts}")
        return cls(samples, classes, **kwargs)

    def _like(self, samples) -> "ImageFolderDataset":
        return type(self)(
            samples, self.classes, crop_size=self.crop_size, resize_size=self.resize_size, scale=self.scale,
            mean=self.mean, std=self.std, name=self.name,
        )

    def subset(self, indices) -> "ImageFolderDataset":
        return self._like([self.samples[int(i)] for i in indices])

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([s[1] for s in self.samples], dtype=torch.int64)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.crop_size, self.crop_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        if isinstance(key, tuple):
            index, augment, sample_seed = key
        else:
            index, augment, sample_seed = key, False, 0
        path, label = self.samples[int(index)]
        rng = np.random.default_rng([int(sample_seed), int(index)]) if augment else None
        return self.load(path, rng), label

    def load(self, path: str, rng: np.random.Generator | None) -> torch.Tensor:
        """Decode ``path``: random resized crop + flip if ``rng`` is given, else resize + centre crop."""
        size = self.crop_size
        try:
            with Image.open(path) as img:
                if rng is None:
                    # JPEG can decode at 1/2, 1/4, 1/8 scale for free; ask for just enough pixels.
                    s = self.resize_size / min(img.size)
                    img.draft("RGB", (math.ceil(img.size[0] * s), math.ceil(img.size[1] * s)))
                img = img.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot decode image {path} ({e}); delete or replace it") from None
        width, height = img.size
        if rng is None:
            s = self.resize_size / min(width, height)
            side = size / s
            left, top = (width - side) / 2, (height - side) / 2
            box = (left, top, left + side, top + side)
            img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
        else:
            box = random_resized_crop_box(width, height, rng, self.scale)
            img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _collate(batch):
    images, labels = zip(*batch)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


_WORKER_ERROR = re.compile(r"^lottery\.errors\.DataError: (.*)$", re.MULTILINE)


class ImageFolderLoader:
    """Same interface as ``BatchLoader`` (``set_epoch``, ``__len__``, ``__iter__``) for image folders.

    A fresh ``DataLoader`` per epoch: the epoch's order and crop seed travel in the sampler's keys,
    so nothing has to be pushed into already-running workers.
    """

    def __init__(
        self,
        dataset: ImageFolderDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        augment: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        num_workers: int = 0,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
        self.seed = int(seed)
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.num_workers = int(num_workers)
        self.normalize = Normalizer(dataset.mean, dataset.std, self.device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.num_samples
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        sample_seed = int(torch.randint(0, 2**62, (1,), generator=g))
        keys = [(int(i), self.augment, sample_seed) for i in order]
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=keys,
            num_workers=self.num_workers,
            collate_fn=_collate,
            drop_last=self.drop_last,
            pin_memory=self.device.type == "cuda",
        )
        batches = iter(loader)
        try:
            for x, y in batches:
                yield self.normalize(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)
        except DataError as e:
            # A worker's error arrives wrapped with its traceback; keep only the message for the user.
            m = _WORKER_ERROR.search(str(e))
            if m is None:
                raise
            raise DataError(m.group(1)) from None
        finally:
            # Stop workers now (also when the consumer breaks early or an error escapes); left to the
            # garbage collector, the traceback's reference cycle delays this and the join then times
            # out after 5 s.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
