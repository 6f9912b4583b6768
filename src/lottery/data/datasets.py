"""The registry of data sets: where each one comes from, how to check it, and its shape.

Everything a reader, the file search and the downloader need to know about a data set lives in one
``DatasetSpec`` so that tests (and users with a private mirror) can swap a spec in ``DATASETS``
without touching code: a test registers the digests of the small files it serves instead of turning
verification off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lottery.dataset_names import canonical_dataset_name, dataset_key
from lottery.errors import ConfigError, UnknownNameError


@dataclass(frozen=True)
class RemoteFile:
    """One file as published by the data set's authors, with every digest we trust for it.

    ``sha256``/``md5`` are of the file exactly as served (the archive). ``payload_sha256`` is of the
    decompressed content of a gzipped IDX file: it identifies the data whoever compressed it (Debian
    recompressed Fashion-MNIST, so the official archive digests do not match its files).
    """

    name: str
    sha256: str | None = None
    md5: str | None = None
    payload_sha256: str | None = None
    payload_size: int | None = None

    @property
    def has_digest(self) -> bool:
        return bool(self.sha256 or self.md5 or self.payload_sha256)


@dataclass(frozen=True)
class DatasetSpec:
    """Static description of a data set; ``dataset_info`` returns it without reading any file.

    ``kind`` selects the reader: ``idx`` (MNIST family), ``cifar10``, ``cifar100``, ``imagefolder``
    or ``synthetic``. ``files`` maps a role (``train_images`` ... or ``archive``) to the published
    file. ``subdirs`` are the folder names tried below a data root (``$LOTTERY_DATA``, an explicit
    ``data_dir``), covering the layouts other tools leave behind (torchvision's ``FashionMNIST/raw``).
    """

    name: str
    kind: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    base_url: str | None = None
    files: dict[str, RemoteFile] = dataclasses.field(default_factory=dict)
    subdirs: tuple[str, ...] = ()
    system_dirs: tuple[str, ...] = ()
    extracted_dir: str | None = None  # CIFAR: the folder inside the archive
    default_val_size: int = 5000
    augment: bool = False
    description: str = ""

    def url(self, role: str, mirror: str | None = None) -> str:
        base = mirror or self.base_url
        if not base:
            raise ConfigError(f"data set {self.name!r} has no download address")
        return base.rstrip("/") + "/" + self.files[role].name


def _idx_files(
    payload: dict[str, tuple[str | None, int]] | None = None,
    sha256: dict[str, str] | None = None,
    md5: dict[str, str] | None = None,
) -> dict[str, RemoteFile]:
    names = {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    }
    out = {}
    for role, stem in names.items():
        p_sha, p_size = (payload or {}).get(role, (None, None))
        out[role] = RemoteFile(
            name=stem + ".gz",
            sha256=(sha256 or {}).get(role),
            md5=(md5 or {}).get(role),
            payload_sha256=p_sha,
            payload_size=p_size,
        )
    return out


DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        kind="idx",
        input_shape=(1, 28, 28),
        num_classes=10,
        mean=(0.2860,),
        std=(0.3530,),
        base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        files=_idx_files(
            md5={
                "train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
                "test_images": "bef4ecab320f06d8554ea6380940ec79",
                "test_labels": "bb300cfdad3c16e7a12a480ee83cd310",
            },
            payload={
                "train_images": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016),
                "train_labels": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008),
                "test_images": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016),
                "test_labels": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008),
            },
        ),
        subdirs=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST"),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        description="Zalando Fashion-MNIST, 28x28 grey clothes pictures (Debian: dataset-fashion-mnist)",
    ),
    "mnist": DatasetSpec(
        name="mnist",
        kind="idx",
        input_shape=(1, 28, 28),
        num_classes=10,
        mean=(0.1307,),
        std=(0.3081,),
        base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        files=_idx_files(
            sha256={
                "train_images": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                "train_labels": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                "test_images": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                "test_labels": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            },
        ),
        subdirs=("mnist", "MNIST/raw", "MNIST"),
        description="LeCun et al. handwritten digits, 28x28 grey",
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        kind="cifar10",
        input_shape=(3, 32, 32),
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        base_url="https://www.cs.toronto.edu/~kriz/",
        files={
            "archive": RemoteFile(
                name="cifar-10-python.tar.gz",
                sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
            )
        },
        subdirs=("cifar10", "cifar-10", "CIFAR10"),
        extracted_dir="cifar-10-batches-py",
        augment=True,
        description="Krizhevsky's CIFAR-10, 32x32 colour, 10 classes",
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        kind="cifar100",
        input_shape=(3, 32, 32),
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        base_url="https://www.cs.toronto.edu/~kriz/",
        files={
            "archive": RemoteFile(
                name="cifar-100-python.tar.gz",
                sha256="85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
            )
        },
        subdirs=("cifar100", "cifar-100", "CIFAR100"),
        extracted_dir="cifar-100-python",
        augment=True,
        description="Krizhevsky's CIFAR-100 (fine labels), 32x32 colour, 100 classes",
    ),
    "imagenet": DatasetSpec(
        name="imagenet",
        kind="imagefolder",
        input_shape=(3, 224, 224),
        num_classes=1000,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        subdirs=("imagenet", "ImageNet", "ILSVRC2012"),
        default_val_size=10000,
        augment=True,
        description="ImageNet-style folder root/{train,val}/<class>/<image>; not downloadable",
    ),
    "synthetic": DatasetSpec(
        name="synthetic",
        kind="synthetic",
        input_shape=(1, 28, 28),
        num_classes=10,
        mean=(0.5,),
        std=(0.25,),
        default_val_size=-1,  # a tenth of train_size, see load_splits
        description="seeded, learnable class patterns plus noise, for tests and smoke runs",
    ),
}


_key = dataset_key  # shared with the hparams (lottery.dataset_names), which store the canonical name


def dataset_names() -> list[str]:
    return sorted(DATASETS)


def canonical_name(name: str) -> str:
    """Map spellings like ``FashionMNIST``, ``fashion_mnist`` or ``CIFAR-10`` to the registered name."""
    built_in = canonical_dataset_name(name)
    if built_in in DATASETS:
        return built_in
    wanted = _key(name)
    for known in DATASETS:  # data sets added at run time (tests, users) by spelling too
        if _key(known) == wanted:
            return known
    raise UnknownNameError(f"unknown data set {name!r}; known data sets: {', '.join(dataset_names())}")


def get_spec(name: str) -> DatasetSpec:
    """The current spec (looked up at call time, so a monkeypatched ``DATASETS`` entry is honoured)."""
    return DATASETS[canonical_name(name)]


def dataset_info(name: str, **overrides) -> DatasetSpec:
    """Input shape, class count and normalisation of a data set without reading any file.

    ``synthetic`` takes ``shape=``/``num_classes=`` (as ``load_splits`` does) because its shape is
    whatever the caller asked for; the returned mean/std of ``synthetic`` are nominal, the loaded
    data set carries the measured ones.
    """
    spec = get_spec(name)
    if not overrides:
        return spec
    if spec.kind != "synthetic":
        unknown = ", ".join(sorted(overrides))
        raise ConfigError(f"dataset_info({spec.name!r}) takes no options (got {unknown})")
    shape = tuple(int(s) for s in overrides.pop("shape", spec.input_shape))
    num_classes = int(overrides.pop("num_classes", spec.num_classes))
    for ignored in ("train_size", "test_size", "noise", "contrast", "data_seed"):  # no effect on shape
        overrides.pop(ignored, None)
    if overrides:
        raise ConfigError(f"unknown synthetic options: {', '.join(sorted(overrides))}")
    c = shape[0]
    return dataclasses.replace(
        spec, input_shape=shape, num_classes=num_classes, mean=(0.5,) * c, std=(0.25,) * c
    )


def default_augment(name: str) -> bool:
    """Whether training on ``name`` uses crop+flip by default: on for natural images, off for digits.

    Flipping a digit or a shoe silhouette changes its meaning or adds nothing, while CIFAR and
    ImageNet models are always trained with these augmentations in the papers we reproduce.
    """
    return get_spec(name).augment
