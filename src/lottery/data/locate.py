"""Finding a data set's files: explicit folder, ``$LOTTERY_DATA``, user cache, system folders, download.

The order goes from most to least deliberate: a folder named on the command line beats an
environment setting, which beats what an earlier run cached, which beats a distribution package
(Debian ships Fashion-MNIST in ``/usr/share/datasets``). Only when all of them lack a complete set
is anything downloaded, and then into the user cache, never into a folder the user named.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lottery.data.cifar import CIFAR10_TEST, CIFAR10_TRAIN, CIFAR100_TEST, CIFAR100_TRAIN
from lottery.data.datasets import DatasetSpec
from lottery.data.download import DownloadError, download
from lottery.errors import DataError

ENV_DATA = "LOTTERY_DATA"
ENV_MIRROR = "LOTTERY_DATA_MIRROR"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lottery"


def cache_dir(name: str) -> Path:
    """Where downloads of data set ``name`` go: one sub-folder per data set under the user cache."""
    return cache_root() / name


def mirror_url(mirror: str | None = None) -> str | None:
    return mirror or os.environ.get(ENV_MIRROR) or None


@dataclass(frozen=True)
class Place:
    folder: Path
    origin: str  # "data_dir", "$LOTTERY_DATA", "cache", "system"


@dataclass
class Located:
    """A complete set of files for one data set, and where it was found.

    ``files`` maps roles to paths: the four IDX files; ``batches`` (an extracted CIFAR folder) or
    ``archive`` (the CIFAR tar.gz); ``train``/``val`` for an image folder.
    """

    spec: DatasetSpec
    place: Place
    files: dict[str, Path]
    downloaded: bool = False

    @property
    def hint(self) -> str:
        """How to fix a damaged file, depending on who put it there."""
        if self.place.origin == "cache" or self.downloaded:
            return "delete it and run again to download a fresh copy"
        if self.place.origin == "system":
            return "reinstall the package that provides it (or delete it and run again to download)"
        url = ""
        if self.spec.base_url:
            url = f" ({self.spec.base_url})"
        return f"replace it with the official file{url}, or delete it to use another copy or a download"


def candidate_places(spec: DatasetSpec, data_dir: str | os.PathLike | None = None) -> list[Place]:
    """Every folder searched for ``spec``, in priority order, without duplicates.

    Below a root the data set's own sub-folders are tried (``fashion-mnist``, ``FashionMNIST/raw``
    ...). A named ``data_dir`` is also tried itself; a ``$LOTTERY_DATA`` root is not, except for
    CIFAR whose file names are unambiguous: MNIST and Fashion-MNIST files have identical names, so a
    bare root could silently serve the wrong one.
    """
    names = (spec.name, *spec.subdirs)
    places: list[Place] = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        places.append(Place(root, "data_dir"))
        places += [Place(root / n, "data_dir") for n in names]
    for root_str in filter(None, os.environ.get(ENV_DATA, "").split(os.pathsep)):
        root = Path(root_str).expanduser()
        if spec.kind in ("cifar10", "cifar100"):
            places.append(Place(root, ENV_DATA))
        places += [Place(root / n, ENV_DATA) for n in names]
    places.append(Place(cache_dir(spec.name), "cache"))
    places += [Place(Path(d), "system") for d in spec.system_dirs]
    seen: set[Path] = set()
    unique = []
    for p in places:
        if p.folder not in seen:
            seen.add(p.folder)
            unique.append(p)
    return unique


def _idx_file(folder: Path, name: str) -> Path | None:
    stem = name[:-3] if name.endswith(".gz") else name
    for candidate in (folder / stem, folder / (stem + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _cifar_batches(kind: str) -> tuple[str, ...]:
    return CIFAR10_TRAIN + CIFAR10_TEST if kind == "cifar10" else CIFAR100_TRAIN + CIFAR100_TEST


def find_in_folder(spec: DatasetSpec, folder: Path) -> tuple[dict[str, Path] | None, str | None]:
    """(files, None) for a complete set in ``folder``; (None, note) for a partial one worth reporting."""
    if not folder.is_dir():
        return None, None
    if spec.kind == "idx":
        found = {role: _idx_file(folder, f.name) for role, f in spec.files.items()}
        have = {r: p for r, p in found.items() if p is not None}
        if len(have) == len(found):
            return have, None
        if have:
            missing = [spec.files[r].name[:-3] for r, p in found.items() if p is None]
            return None, f"{folder} lacks {', '.join(missing)}"
        return None, None
    if spec.kind in ("cifar10", "cifar100"):
        batches = _cifar_batches(spec.kind)
        for sub in (folder / spec.extracted_dir, folder):  # type: ignore[operator]
            present = [b for b in batches if (sub / b).is_file()]
            if len(present) == len(batches):
                return {"batches": sub}, None
            if present:
                missing = sorted(set(batches) - set(present))
                return None, f"{sub} lacks {', '.join(missing)}"
        archive = folder / spec.files["archive"].name
        if archive.is_file():
            return {"archive": archive}, None
        return None, None
    if spec.kind == "imagefolder":
        train, val = folder / "train", folder / "val"
        if train.is_dir() and val.is_dir():
            return {"train": train, "val": val}, None
        if train.is_dir() or val.is_dir():
            return None, f"{folder} has only one of train/ and val/"
        return None, None
    raise ValueError(f"data set kind {spec.kind!r} has no files")


def expected_layout(spec: DatasetSpec) -> str:
    if spec.kind == "idx":
        return ", ".join(f.name[:-3] for f in spec.files.values()) + " (each optionally .gz)"
    if spec.kind in ("cifar10", "cifar100"):
        return (
            f"{spec.files['archive'].name}, or the extracted {spec.extracted_dir}/ with "
            f"{', '.join(_cifar_batches(spec.kind))}"
        )
    return "train/<class>/<image> and val/<class>/<image> (JPEG, PNG, ...)"


def _first_complete(spec: DatasetSpec, places: list[Place], notes: list[str]) -> Located | None:
    """The first of ``places`` with a complete set; what the incomplete ones lack goes to ``notes``."""
    for place in places:
        files, note = find_in_folder(spec, place.folder)
        if files is not None:
            return Located(spec, place, files)
        if note:
            notes.append(note)
    return None


def locate(
    spec: DatasetSpec,
    data_dir: str | os.PathLike | None = None,
    *,
    download_missing: bool = True,
    mirror: str | None = None,
    progress: bool | None = None,
) -> Located:
    """Find a complete set of files for ``spec``, downloading into the cache as a last resort.

    A ``data_dir`` the user named is used or refused: when it (or its data-set sub-folders) holds no
    complete copy, this fails naming it rather than quietly reading another copy or downloading one."""
    places = candidate_places(spec, data_dir)
    notes: list[str] = []
    if data_dir is not None:
        named = [p for p in places if p.origin == "data_dir"]
        found = _first_complete(spec, named, notes)
        if found is not None:
            return found
        raise DataError(
            f"the data folder {data_dir} (--data-dir) holds no complete copy of {spec.name} (searched "
            + ", ".join(str(p.folder) for p in named) + ")"
            + (f": {'; '.join(notes)}" if notes else "")
            + f". Expected files: {expected_layout(spec)}. Fix the folder, or leave out --data-dir (data_dir) to use "
            f"${ENV_DATA}, the cache ({cache_dir(spec.name)}), a system copy or a download."
        )
    found = _first_complete(spec, places, notes)
    if found is not None:
        return found

    base = mirror_url(mirror) or spec.base_url
    if not spec.files or not base:
        reason = f"{spec.name} cannot be downloaded"
    elif not download_missing:
        reason = "downloading is disabled (download=False)"
    else:
        target = cache_dir(spec.name)
        try:
            for role, remote in spec.files.items():
                existing = _idx_file(target, remote.name) if spec.kind == "idx" else None
                if existing is None:
                    download(spec.url(role, base), target / remote.name, remote, progress=progress)
        except DownloadError as e:
            reason = f"the download failed: {e}"
        else:
            files, note = find_in_folder(spec, target)
            if files is None:  # pragma: no cover - we just wrote them
                raise DataError(f"downloaded {spec.name} into {target} but cannot find it there ({note})")
            return Located(spec, Place(target, "cache"), files, downloaded=True)

    searched = "\n".join(f"  - {p.folder} ({p.origin})" for p in places)
    lines = [
        f"cannot find the {spec.name} data set. Searched, in order:",
        searched,
        f"Expected files: {expected_layout(spec)}.",
    ]
    if notes:
        lines.append("Incomplete copies: " + "; ".join(notes) + ".")
    if spec.files and base:
        lines.append("Official address: " + ", ".join(spec.url(r, base) for r in spec.files) + ".")
    lines.append(f"Not downloaded: {reason}.")
    lines.append(
        f"Fix: put the files in one of these folders, pass data_dir (--data-dir), or set ${ENV_DATA} "
        f"to a folder holding a {spec.name}/ sub-folder"
        + (", or allow the download" if spec.files and base and not download_missing else "")
        + "."
    )
    raise DataError("\n".join(lines))


def describe_source(located: Located) -> str:
    """``/usr/share/datasets/fashion-mnist (system copy)``: where a run's data came from, for its log."""
    origin = {"data_dir": "--data-dir", ENV_DATA: f"${ENV_DATA}", "cache": "user cache",
              "system": "system copy"}.get(located.place.origin, located.place.origin)
    return f"{located.place.folder} ({origin}{', downloaded now' if located.downloaded else ''})"
