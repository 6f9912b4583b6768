"""Experiments: run folders named by a hash of their hparams, stages that skip when done, results.

This is the only layer that knows about folders. A run folder holds ``hparams.json`` (everything
needed to rerun it), ``metrics.csv`` (one row per evaluation), ``checkpoint.safetensors`` (while
training; the run resumes from it), the final weights and ``results.json``. A stage whose output file
exists returns it at once, so re-running a killed command continues where it stopped.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lottery.cost import add_cost
from lottery.engine import Callback, Trainer
from lottery.errors import CheckpointError, ConfigError, LotteryError
from lottery.hparams import DataHparams, Hparams, ModelHparams, TrainingHparams, hparams_hash
from lottery.io import (
    atomic_write_bytes, read_json, relocated_path, remove_if_exists, safetensors_problem, save_tensors, storage_error,
    write_json,
)
from lottery.step import Step


@dataclass
class RunOptions:
    """Where and how to run; not part of a run's identity (not hashed)."""

    out: Path = Path("runs")
    data_dir: str | None = None
    device: str = "cpu"
    progress: bool = True
    download: bool = True
    log: Any = None  # a callable taking one line; default: tqdm.write
    strict: bool = False  # CS: a search round whose mask did not converge is an error, not a warning
    tensorboard: bool = False  # also write metrics.csv's rows as TensorBoard events (lottery.tracking)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.device = resolve_device(self.device)
        if self.tensorboard:
            from lottery.tracking import require_tensorboard

            require_tensorboard()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible to PyTorch; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda") and device != "mps":
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    return device


def log_line(options: RunOptions, msg: str) -> None:
    if options.log is not None:
        options.log(msg)
    else:
        from tqdm.auto import tqdm

        tqdm.write(msg)


# -- run folders -----------------------------------------------------------------------------------
def run_folder_name(kind: str, data: DataHparams, model: ModelHparams, *groups: Hparams, seed: int = 0) -> str:
    """``{kind}_{model}_{dataset}_{hash}``: readable, and unique per non-default hparams + seed."""
    extra = {"seed": seed} if seed != 0 else None
    digest = hparams_hash(data, model, *groups, extra=extra)
    return f"{kind}_{model.model}_{data.dataset}_s{seed}_{digest}"


def describe_run(kind: str, seed: int, **groups: Hparams) -> dict[str, Any]:
    return {"kind": kind, "seed": seed, **{name: g.to_dict() for name, g in groups.items()}}


#: Written beside hparams.json when a run folder is created: which lottery (and, from a clone, which
#: commit) wrote it. Not part of the run's identity: a folder made by another version is still reused
#: when its hparams match, and refused with its writer named when they do not.
PROVENANCE_FILE = "lottery.json"


def provenance() -> dict[str, Any]:
    """The lottery version, and the git commit when lottery runs from a clone (``git_dirty``: tracked
    files changed since that commit); also python and torch, and what decides whether the same seed
    gives the same numbers bit for bit: the torch CPU threads (``torch_threads``) and the CPU (``cpu``).
    Floating-point sums taken in another order (another thread count, other CPU kernels) give other
    roundings, and a high-learning-rate first epoch amplifies them: the same ResNet-20 seed was measured
    at 80.4 % validation accuracy after one epoch with 1 thread and 66.5 % with 2 (benchmarks/RESULTS.md)."""
    return {**_fixed_provenance(), "torch_threads": torch.get_num_threads()}


@functools.lru_cache(maxsize=1)
def _fixed_provenance() -> dict[str, Any]:
    """What :func:`provenance` reports that cannot change while the process runs. Asked once, when this
    module is imported (below): the commit of the code the process runs, not of whatever the checkout
    holds when a folder is made later (a long sweep's workers outlive a ``git pull`` or a commit)."""
    import platform
    import subprocess

    from lottery import __version__

    info: dict[str, Any] = {"lottery_version": __version__, "python": platform.python_version(),
                            "torch": torch.__version__, "cpu": cpu_name()}
    package = Path(__file__).resolve().parent
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=5,
                                  check=True).stdout.strip()

        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if top / "src" / "lottery" == package:  # this checkout's lottery, not some other repository around it
            info["git_commit"] = git("rev-parse", "HEAD")
            info["git_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass  # not a clone, or no git: the version says enough
    return info


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what the platform module says, possibly "")."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


_fixed_provenance()  # now, at import (see its docstring)


def _written_by(path: Path) -> str:
    """``lottery 0.1.0 (commit abc1234)`` for a run folder, from its lottery.json."""
    try:
        info = read_json(path / PROVENANCE_FILE)
    except (OSError, ValueError):
        return "a lottery version that recorded none (before 2026-12-02)"
    commit = info.get("git_commit")
    return (f"lottery {info.get('lottery_version', '?')}"
            + (f" (commit {commit[:10]}{', modified' if info.get('git_dirty') else ''})" if commit else ""))


#: Folders checked by :func:`prepare_run_folder` but not created yet: :func:`folder_lock` creates them
#: when work starts, so that a settings error found in between (a rewind point after the end, data that
#: cannot be found) leaves nothing behind.
_PENDING: dict[Path, dict[str, Any]] = {}

#: What a run folder holds before its run has written anything: such a folder is removed again when
#: the run fails before writing more (see :func:`folder_lock`).
_FOLDER_SKELETON = frozenset({"hparams.json", PROVENANCE_FILE, ".lock"})


def prepare_run_folder(path: Path, description: dict[str, Any]) -> Path:
    """Check a run folder against ``description`` before any work: a folder that holds a different
    configuration is refused, naming the lottery that wrote it. A new folder is not created here but
    when the run takes its lock (:func:`folder_lock`), with its hparams.json and lottery.json."""
    hp_file = path / "hparams.json"
    if hp_file.exists():
        try:
            existing = read_json(hp_file)
        except (ValueError, OSError) as e:  # damaged outside lottery: its own writes are atomic
            raise ConfigError(f"{hp_file} is unreadable ({e}); it cannot tell which run this folder holds: "
                              "choose another --out or delete that folder") from None
        if not _same_description(existing, description):
            diffs = _dict_diff(existing, description)
            raise ConfigError(
                f"{path} holds a run with other hparams ({'; '.join(diffs[:8])}), written by {_written_by(path)}; "
                "choose another --out or delete that folder"
            )
    else:
        _PENDING[Path(path).absolute()] = description
    return path


def _create_run_folder(path: Path) -> list[Path]:
    """Create a folder that :func:`prepare_run_folder` checked; the folders this call created (the run
    folder and any missing parents, such as a new ``--out``), innermost first; empty when it created
    no run (the folder and its hparams.json were there)."""
    description = _PENDING.pop(Path(path).absolute(), None)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(path, e) from None
    if description is None or (path / "hparams.json").exists():
        return []
    from lottery.models.plugins import imported_model_modules

    modules = imported_model_modules()
    write_json(path / PROVENANCE_FILE, {**provenance(), **({"model_modules": modules} if modules else {})})
    write_json(path / "hparams.json", description)
    return missing or [path]


def _remove_if_unused(created: list[Path]) -> None:
    """Remove a run folder this process created when its run failed before writing anything of its own,
    and the parents it created for it if they are empty."""
    path = created[0]
    try:
        files = [p for p in path.rglob("*") if not p.is_dir()]
        if all(f.parent == path and f.name in _FOLDER_SKELETON for f in files):  # empty sub-folders allowed
            shutil.rmtree(path)
            for parent in created[1:]:
                parent.rmdir()  # fails (and stops) at one that is not empty: another run is using it
    except OSError:
        pass  # another process is using it, or it is already gone: leave it


def check_run_model_known(folder: Path, description: dict[str, Any]) -> None:
    """Fail, before anything is built, when a run folder's model is not registered in this process,
    naming the modules (``--import``) that registered it when the run was made."""
    from lottery.errors import UnknownNameError
    from lottery.models import get_model_spec

    name = (description.get("model") or {}).get("model")
    try:
        get_model_spec(str(name))
    except UnknownNameError as e:
        try:
            modules = read_json(folder / PROVENANCE_FILE).get("model_modules") or []
        except (OSError, ValueError):
            modules = []
        if modules:
            flags = " ".join(f"--import {m}" for m in modules)
            raise UnknownNameError(f"the model {name!r} of {folder} is not registered; that run was made with "
                                   f"{flags}: give the same flag(s) here") from None
        raise e from None


def _same_description(existing: Any, description: Any) -> bool:
    """Whether a folder's hparams.json describes this run. A field added to lottery after the folder was
    written is missing from its file; it still matches when its value here is None (such a field's "not used"
    setting, which leaves the run as it was), so runs of older versions are still found and resumed."""
    if isinstance(existing, dict) and isinstance(description, dict):
        if set(existing) - set(description):
            return False
        return all(_same_description(existing[k], v) if k in existing else v is None for k, v in description.items())
    return existing == description


def _dict_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _dict_diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} there, {b!r} now"]


@contextmanager
def folder_lock(path: Path, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on a run folder, so two processes never write the same run.

    ``wait=False`` fails at once with a clear message (a user started the same command twice);
    ``wait=True`` blocks until the other process is done (sweep workers sharing a dense reference).
    """
    from filelock import FileLock, Timeout

    from lottery.distributed import is_main

    if not is_main():  # the ranks of one data-parallel run share rank 0's lock
        yield
        return
    created = _create_run_folder(path)
    lock = FileLock(str(path / ".lock"))
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        raise LotteryError(
            f"another process is already running in {path} (lock file {path / '.lock'}); "
            "wait for it to finish, or stop it first"
        ) from None
    except OSError as e:  # a read-only folder (or file system), no permission
        raise storage_error(path / ".lock", e) from None
    try:
        _remove_stale_temp_files(path)
        yield
    except BaseException:
        if created:  # a run that failed before writing anything leaves no folder behind
            lock.release()
            _remove_if_unused(created)
        raise
    finally:
        if lock.is_locked:
            lock.release()


def _remove_stale_temp_files(folder: Path) -> None:
    """Delete the temporary files of checkpoint writes (``.checkpoint.safetensors.<random>.tmp``) that a
    killed process left: never read, but each as large as a checkpoint. Checkpoints are written only by
    a trainer, under this lock, so such a file belongs to a dead process. (The temporary files of other
    writes are small, and some of those writes, plots for one, happen outside the lock.)"""
    for tmp in folder.rglob(".*checkpoint.safetensors.*.tmp"):
        try:
            tmp.unlink()
        except OSError:
            pass


# -- metrics -------------------------------------------------------------------------------------
def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        for k in row:
            if k not in columns:
                columns.append(k)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    atomic_write_bytes(path, buf.getvalue().encode())


class MetricsCSV(Callback):
    """Rewrites ``metrics.csv`` from the trainer's history at every epoch end (atomic, so always whole)."""

    def __init__(self, path: Path, prefix_rows: list[dict[str, Any]] | None = None, extra: dict[str, Any] | None = None,
                 tensorboard: bool = False):
        self.path = path
        self.prefix_rows = prefix_rows or []
        self.extra = extra or {}
        self.tensorboard = tensorboard

    def _write(self, trainer: Trainer) -> None:
        rows = self.prefix_rows + [{**self.extra, **r} for r in trainer.history]
        write_metrics_csv(self.path, rows)
        if self.tensorboard:
            from lottery.tracking import write_tensorboard

            write_tensorboard(self.path.parent, rows)

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        self._write(trainer)

    def on_fit_end(self, trainer: Trainer) -> None:
        self._write(trainer)


# -- data and models -----------------------------------------------------------------------------
@dataclass
class DataBundle:
    splits: Any
    num_classes: int
    input_shape: tuple[int, int, int]
    augment: bool


_SPLITS_CACHE: dict[tuple, Any] = {}


def load_data(data: DataHparams, options: RunOptions) -> DataBundle:
    """Load (once per process) the splits of a data set, with its validation hold-out."""
    from lottery import data as data_mod

    key = (data.dataset, options.data_dir, data.val_size, data.split_seed, tuple(sorted(data.synthetic_options().items())))
    if key not in _SPLITS_CACHE:
        _SPLITS_CACHE[key] = data_mod.load_splits(
            data.dataset, data_dir=options.data_dir, val_size=data.val_size, seed=data.split_seed,
            download=options.download, **data.synthetic_options(),
        )
    splits = _SPLITS_CACHE[key]
    if splits.source:
        log_line(options, f"data: {data.dataset} from {splits.source}")
    augment = data.augment if data.augment is not None else data_mod.default_augment(data.dataset)
    # Class count and shape come from the loaded data, not the data set's nominal entry: a small
    # image folder or a synthetic set has its own.
    return DataBundle(splits, int(splits.train.num_classes), tuple(splits.train.input_shape), bool(augment))


def make_loaders(bundle: DataBundle, training: TrainingHparams, seed: int, options: RunOptions):
    """The training loader (seeded data order) and the evaluation loaders {val, test}."""
    from lottery.data import make_loader

    from lottery.distributed import ShardedLoader, is_distributed

    order_seed = training.data_order_seed if training.data_order_seed is not None else seed
    train = make_loader(bundle.splits.train, training.batch_size, train=True, seed=order_seed,
                        augment=bundle.augment, device=options.device)
    eval_bs = max(training.batch_size, 1000)
    evals = {}
    if bundle.splits.val is not None and len(bundle.splits.val) > 0:
        evals["val"] = make_loader(bundle.splits.val, eval_bs, train=False, seed=0, augment=False, device=options.device)
    evals["test"] = make_loader(bundle.splits.test, eval_bs, train=False, seed=0, augment=False, device=options.device)
    if is_distributed():  # each rank trains and evaluates on its slice of every batch
        train = ShardedLoader(train)
        evals = {k: ShardedLoader(v) for k, v in evals.items()}
    return train, evals


def nominal_shape(data: DataHparams) -> tuple[tuple[int, int, int], int]:
    """The data set's input shape and number of classes, from its registry entry (no data is read)."""
    from lottery.data import dataset_info

    spec = dataset_info(data.dataset, **data.synthetic_options())
    return tuple(spec.input_shape), int(spec.num_classes)  # type: ignore[return-value]


def input_normalisation(data: DataHparams) -> dict[str, list[float]]:
    """The per-channel ``mean`` and ``std`` with which a run's loaders normalise its inputs,
    ``(x / 255 - mean) / std`` on uint8 pixels: the data set's registered values, or for ``synthetic`` the
    values measured on its generated training set (what its loaders use)."""
    from lottery import data as data_mod

    spec = data_mod.dataset_info(data.dataset, **data.synthetic_options())
    if spec.kind == "synthetic":
        train, _ = data_mod.load_train_test(data.dataset, **data.synthetic_options())
        return {"mean": [float(v) for v in train.mean], "std": [float(v) for v in train.std]}
    return {"mean": [float(v) for v in spec.mean], "std": [float(v) for v in spec.std]}


def build_model_without_data(data: DataHparams, model: ModelHparams) -> nn.Module:
    """A run's network (freshly initialised), built for the data set's nominal shape: for looking at a
    finished run's masks and weights without loading its data."""
    from lottery.models import build_model as build

    shape, classes = nominal_shape(data)
    kwargs = {"width": model.width} if model.width is not None else {}
    return build(model.model, input_shape=shape, num_classes=classes, **kwargs)


def build_model(model: ModelHparams, bundle: DataBundle, seed: int) -> nn.Module:
    """Build the network for the data's shape; its initial weights depend only on ``seed``."""
    from lottery.models import build_model as build

    kwargs = {}
    if model.width is not None:
        kwargs["width"] = model.width
    torch.manual_seed(seed)
    return build(model.model, input_shape=bundle.input_shape, num_classes=bundle.num_classes, **kwargs)


def rewind_point(rewind: str, training: TrainingHparams, search_steps: str, ipe: int, *, ticket: bool,
                 owner: str) -> Step:
    """The rewind point ``k`` of a search-then-retrain method (CS, L0) as a Step.

    A ticket is the mask applied to the weights at ``k``, saved *during* the search and retrained from
    ``k`` to the end of training, so ``k`` must lie before the end of training and within the search;
    checked before any training so that an impossible setting fails at once. ``owner`` names the hparam
    in the message (``CSHparams.rewind``); pruning runs (``ticket=False``) accept any ``k``.
    """
    k = Step.parse(rewind, ipe)
    end = Step.parse(training.training_steps, ipe)
    search_end = Step.parse(search_steps, ipe)
    if ticket and (k >= end or k > search_end):
        raise ConfigError(
            f"{owner} {rewind} (--{owner.rsplit('.', 1)[-1].replace('_', '-')}) is not before the end of training "
            f"({training.training_steps}) and of the search ({search_steps}): choose an earlier rewind point"
        )
    return k


def prune_ignore(model: ModelHparams) -> tuple[str, ...]:
    from lottery.models import get_model_spec

    return tuple(model.prune_ignore) if model.prune_ignore is not None else get_model_spec(model.model).prune_ignore


def final_row(history: list[dict[str, Any]]) -> dict[str, Any]:
    return history[-1] if history else {}


# -- the dense training job ------------------------------------------------------------------------
@dataclass
class DenseJob:
    data: DataHparams = field(default_factory=DataHparams)
    model: ModelHparams = field(default_factory=ModelHparams)
    training: TrainingHparams = field(default_factory=TrainingHparams)
    seed: int = 0


#: Beside each results.json: the run's weight and mask files with their sizes when it finished, checked
#: whenever the run is reused (written just before results.json, which marks the run finished).
ARTEFACTS_FILE = "artefacts.json"

# Keys of a results.json that name folders: rewritten to where the folder is now when a moved run is reused.
_FOLDER_KEYS = ("dense_run_dir", "source_run")


def write_results(path: Path, results: dict[str, Any]) -> None:
    """Write a run's (or an IMP level's) results.json, last, after ``artefacts.json``: the size of every
    ``.safetensors`` file of its folder (checkpoints left out), so that a deleted or damaged artefact is
    found when the run is reused instead of being taken for a finished one (:func:`finished_results`)."""
    folder = path.parent
    problem = mask_numbers_problem(results, folder)
    if problem is not None:  # an internal invariant: a number about a mask other than the one saved
        raise LotteryError(f"refusing to write {path}: {problem}; this is a bug in lottery, please report it")
    # Every stage below this folder has finished: a checkpoint still here is one that a run killed between a
    # stage's outputs and the checkpoint's removal left behind (a resumed run reads the outputs, not it).
    for stale in folder.rglob("checkpoint.safetensors"):
        remove_if_exists(stale)
    files = [f for f in sorted(folder.rglob("*.safetensors")) if f.name != "checkpoint.safetensors"
             and not f.name.startswith(".")]
    for f in files:  # never record (and so vouch for) a file that was damaged while the run was stopped
        problem = safetensors_problem(f)
        if problem is not None:
            raise CheckpointError(f"{f} is damaged ({problem}); delete it and run the same command again to rebuild it")
    artefacts = {f.relative_to(folder).as_posix(): f.stat().st_size for f in files}
    write_json(folder / ARTEFACTS_FILE, artefacts)
    write_json(path, results)


#: Numbers of a results.json that describe the mask beside it (``mask.safetensors``).
MASK_NUMBERS = ("density", "kept_weights", "prunable_weights")


def mask_numbers_problem(results: dict[str, Any], folder: Path) -> str | None:
    """Where ``results``' density, kept and prunable weights differ from what ``folder/mask.safetensors``
    holds (None when they agree, or when the results or the folder have none of them). A number is
    never reported without being checked against the artefact it describes."""
    path = folder / "mask.safetensors"
    if not all(k in results for k in MASK_NUMBERS) or not path.is_file():
        return None
    from lottery.masks import Mask

    mask = Mask.load(path)
    actual = {"density": mask.density(), "kept_weights": mask.num_kept(), "prunable_weights": mask.num_total()}
    wrong = [f"{k} {results[k]!r} where {path.name} holds {actual[k]!r}" for k in MASK_NUMBERS
             if not (isinstance(results[k], (int, float)) and not isinstance(results[k], bool)
                     and math.isclose(results[k], actual[k], rel_tol=1e-12, abs_tol=0.0))]
    return "; ".join(wrong) or None


def metrics_csv_problem(path: Path) -> str | None:
    """Why a metrics.csv is not whole (no header, a row of another width than the header, not text), or
    None. lottery writes it atomically, so a damaged one was changed by something else."""
    try:
        rows = list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8"))))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return f"unreadable: {' '.join(str(e).split())}"
    if not rows or not rows[0]:
        return "no header"
    bad = [i + 1 for i, r in enumerate(rows) if len(r) != len(rows[0])]
    if bad:
        return f"line {bad[0]} has {len(rows[bad[0] - 1])} fields, the header {len(rows[0])}"
    return None


def _relocated(results: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A results.json read where its folder is now: ``run_dir`` (``level_dir`` for an IMP level) is that
    folder, and the folders it names are looked up relative to it (a run folder can be moved or shared)."""
    is_level = folder.name.startswith("level_") and "level_dir" in results
    stored_self = results.get("level_dir" if is_level else "run_dir")
    out = dict(results)
    for key in _FOLDER_KEYS:
        if out.get(key):
            out[key] = relocated_path(str(out[key]), stored_self, folder)
    if is_level:
        out["level_dir"] = str(folder)
        if out.get("run_dir"):
            out["run_dir"] = str(folder.parent)
    elif "run_dir" in out:
        out["run_dir"] = str(folder)
    if isinstance(out.get("levels"), list) and not is_level:
        out["levels"] = [_relocated(lv, folder / f"level_{lv['level']}") if isinstance(lv, dict) and "level" in lv
                         and (folder / f"level_{lv['level']}").is_dir() else lv for lv in out["levels"]]
    return out


def finished_results(results_path: Path, options: RunOptions) -> dict[str, Any] | None:
    """A finished run's (or IMP level's) results, or None when it must run (again).

    Every weight or mask file its results.json lists must be there, whole: a missing one is rebuilt (the
    results file is set aside and the run resumes from what is left), a damaged one is refused naming
    it. Paths are those of where the folder is now."""
    if not results_path.exists():
        return None
    folder = results_path.parent
    try:
        results = read_json(results_path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{results_path} is unreadable ({e}); delete it and run the same command again to "
                              "rebuild it") from None
    try:
        artefacts = read_json(folder / ARTEFACTS_FILE)
    except (OSError, ValueError):
        artefacts = {}  # a run finished before lottery recorded them: taken as it is
    missing = []
    for rel, size in artefacts.items():
        problem = safetensors_problem(folder / rel, size)
        if problem == "missing":
            missing.append(rel)
        elif problem is not None:
            raise CheckpointError(f"{folder / rel} is damaged ({problem}); delete it and run the same command "
                                  "again to rebuild it")
    if not isinstance(results, dict):
        raise CheckpointError(f"{results_path} is not a results record (a JSON {type(results).__name__}); delete it "
                              "and run the same command again to rebuild it")
    metrics = folder / "metrics.csv"
    problem = metrics_csv_problem(metrics) if metrics.is_file() else None
    if problem is not None:
        raise CheckpointError(f"{metrics} is damaged ({problem}); delete it and {results_path.name} beside it and run "
                              "the same command again to rebuild them")
    if not missing:
        problem = mask_numbers_problem(results, folder)
        if problem is not None:
            raise CheckpointError(f"{results_path} does not describe its folder's mask ({problem}); delete it and run "
                                  "the same command again to rebuild it")
    if missing:
        log_line(options, f"{folder}: finished, but {', '.join(missing)} is missing: running again to rebuild it")
        remove_if_exists(results_path)
        return None
    return _relocated(results, folder)


def reuse_finished(folder: Path, description: dict[str, Any], options: RunOptions) -> dict[str, Any] | None:
    """Check the run folder (:func:`prepare_run_folder`) and return its results if the run has already
    finished whole (:func:`finished_results`), else None. Every stage starts this way: a finished run is
    never trained again, and a run with a missing artefact is completed again."""
    prepare_run_folder(folder, description)
    done = finished_results(folder / "results.json", options)
    if done is not None:
        log_line(options, f"{folder}: already finished, reusing its results")
    return done


def copy_finished_files(source: Path, folder: Path, files: list[str], last: str, optional: tuple[str, ...] = ()) -> bool:
    """Copy ``files`` (paths relative to the run folders) from ``source`` into ``folder`` if every one of
    them exists there (and those of ``optional`` that exist), ``last`` (one of ``files``, the file whose
    presence marks the work as done) last so that a copy interrupted half-way is never taken for a
    finished one. Returns whether it copied.

    Why: a search that does not depend on how its result is used (a ticket and a pruned network of the
    same setting) is run once, and the second run folder starts from the first one's files."""
    if last not in files or not all((source / name).exists() for name in files):
        return False
    files = list(files) + [name for name in optional if (source / name).exists()]
    for name in sorted(files, key=lambda n: n == last):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / name, (source / name).read_bytes())
    return True


def train_dense(job: DenseJob, options: RunOptions, wait_for_lock: bool = False) -> dict[str, Any]:
    """Train a dense network; write its run folder; return ``results.json``'s content.

    ``wait_for_lock``: when another process is training this very network (several CS runs sharing
    one dense reference), wait for it and reuse its result instead of failing.
    """
    folder = options.out / run_folder_name("train", job.data, job.model, job.training, seed=job.seed)
    desc = describe_run("train", job.seed, data=job.data, model=job.model, training=job.training)
    results_path = folder / "results.json"
    done = reuse_finished(folder, desc, options)
    if done is not None:
        remove_if_exists(folder / "checkpoint.safetensors")  # left behind when killed right after results.json
        return done
    with folder_lock(folder, wait=wait_for_lock):
        finished = finished_results(results_path, options)  # finished by the process we waited for
        if finished is not None:
            return finished
        return _train_dense_locked(job, folder, options)


def _train_dense_locked(job: DenseJob, folder: Path, options: RunOptions) -> dict[str, Any]:
    """The body of :func:`train_dense`, with the folder's lock held."""
    bundle = load_data(job.data, options)
    model = build_model(job.model, bundle, job.seed)
    train_loader, evals = make_loaders(bundle, job.training, job.seed, options)
    trainer = Trainer(
        model, train_loader, job.training, eval_loaders=evals, device=options.device,
        checkpoint_path=folder / "checkpoint.safetensors", callbacks=[MetricsCSV(folder / "metrics.csv", tensorboard=options.tensorboard)],
        progress=options.progress, desc="dense", log=options.log,
    )
    history = trainer.fit()
    return _finish_dense(job, folder, model, final_row(history), trainer.step.epochs, trainer.wall_seconds,
                         bundle.input_shape)


def _finish_dense(job: DenseJob, folder: Path, model: nn.Module, last: dict[str, Any], epochs: float,
                  wall_seconds: float, input_shape: tuple[int, int, int],
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a finished dense run's weights and results.json (last); return the results."""
    save_tensors(folder / "model.safetensors", model.state_dict())
    results = {
        "kind": "train",
        "method": "dense",
        "model": job.model.model,
        "dataset": job.data.dataset,
        "seed": job.seed,
        "test_accuracy": last.get("test_accuracy"),
        "val_accuracy": last.get("val_accuracy"),
        "test_loss": last.get("test_loss"),
        "density": 1.0,
        "epochs": epochs,
        "wall_seconds": wall_seconds,
        "run_dir": str(folder),
        **(extra or {}),
    }
    add_cost(results, model, None, input_shape)
    write_results(folder / "results.json", results)
    remove_if_exists(folder / "checkpoint.safetensors")
    return results


# -- stacked dense training (issue 23) -------------------------------------------------------------
def data_order_of(training: TrainingHparams, seed: int) -> int:
    """The seed of a run's data order (and augmentation): ``data_order_seed``, else the run's seed."""
    return training.data_order_seed if training.data_order_seed is not None else seed


#: Largest stacks ``--stack auto`` picks: on the CPU the size the speed benchmark measured
#: (benchmarks/stacked_cs_speed.py, K = 2, 4, 8); on a GPU the issue's target point (K = 16).
AUTO_STACK_CPU = 8
AUTO_STACK_GPU = 16
#: Bytes of training state per parameter, for the memory bound: weights, gradients, mask logits and their
#: gradients, SGD momentum, Adam's two moments (a CS search; a dense run needs less), x2 for activations.
_STATE_BYTES_PER_PARAMETER = 4 * 7 * 2


def auto_stack_size(model: nn.Module, device: str, members: int, workers: int = 1) -> tuple[int, str]:
    """The stack size ``--stack auto`` uses for ``members`` runs of ``model`` on ``device``, and why (one line).

    At most :data:`AUTO_STACK_CPU` / :data:`AUTO_STACK_GPU`, at most ``members``, and at most what fits in
    a quarter of the free memory of the device (RAM on the CPU) at the training state's size. On the CPU
    also at most ``ceil(members / workers)``: a sweep runs each stack on one worker, and a stack of 8 that
    leaves the second of 2 workers idle is slower than two stacks of 4 side by side. On the CPU, networks
    with convolutions are not stacked: their stacks (grouped convolutions) were slower than the same runs
    unstacked (Conv-4 at width 0.125, K = 4: 0.78x in one process, 0.94x as two stacks on 2 workers,
    benchmarks/RESULTS.md); an explicit ``--stack K`` still stacks them. 1: no stacking."""
    params = sum(p.numel() for p in model.parameters())
    per_member = params * _STATE_BYTES_PER_PARAMETER
    by_workers = members
    if not str(device).startswith("cuda") and any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
        return 1, (f"--stack auto: no stacks (each run alone) for {type(model).__name__} on the CPU: stacked "
                   "convolutions ran slower than unstacked runs there (benchmarks/RESULTS.md); --stack K forces stacks")
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        cap, where = AUTO_STACK_GPU, "GPU"
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not on Linux: no memory bound
            free = 1 << 50
        cap, where = AUTO_STACK_CPU, "CPU"
        by_workers = -(-members // max(1, workers))
    by_memory = max(1, int(free // 4 // max(1, per_member)))
    k = max(1, min(cap, members, by_workers, by_memory))
    limit = ("the number of runs that can share a stack" if k == members else
             f"the {workers} workers (a stack each)" if k == by_workers else
             f"a quarter of the free {where} memory ({free / 2**30:.1f} GiB)" if k == by_memory else
             f"the largest {where} stack measured")
    what = f"stacks of {k}" if k > 1 else "no stacks (each run alone)"
    return k, (f"--stack auto: {what} for {type(model).__name__} ({params:,} parameters, about "
               f"{per_member / 2**20:.0f} MiB of training state per member) on the {where}; limited by {limit}")


def stack_refusal(jobs: list[DenseJob]) -> str | None:
    """Why dense ``jobs`` cannot train as one stack (one line), or None. Members must differ only in
    their seed (the initialisation) and share one data order, which their hparams state
    (``TrainingHparams.data_order_seed``)."""
    first = jobs[0]
    if any((j.data, j.model, j.training) != (first.data, first.model, first.training) for j in jobs):
        return "the members differ in more than their seed"
    if len({data_order_of(j.training, j.seed) for j in jobs}) > 1:
        return ("the members do not share one data order: set TrainingHparams.data_order_seed "
                "(--train.data_order_seed) to stack runs of different seeds")
    if len({j.seed for j in jobs}) < len(jobs):
        return "two members have the same seed"
    return None


class StackedMetricsCSV(Callback):
    """Each member's ``metrics.csv`` (the rows an unstacked run writes), rewritten at every epoch end.

    ``prefix_rows`` (per member) and ``stage``: for a stage of a multi-stage run (a CS round, the ticket),
    the member's earlier rows come first and this stage's rows are tagged ``stage``."""

    def __init__(self, paths: list[Path], tensorboard: bool = False,
                 prefix_rows: list[list[dict[str, Any]]] | None = None, stage: str | None = None):
        self.paths = paths
        self.tensorboard = tensorboard
        self.prefix_rows = prefix_rows if prefix_rows is not None else [[] for _ in paths]
        self.stage = stage

    def _write(self, trainer) -> None:
        for path, prefix, hist in zip(self.paths, self.prefix_rows, trainer.member_histories):
            rows = prefix + ([{"stage": self.stage, **r} for r in hist] if self.stage is not None else list(hist))
            write_metrics_csv(path, rows)
            if self.tensorboard:
                from lottery.tracking import write_tensorboard

                write_tensorboard(path.parent, rows)

    def on_epoch_end(self, trainer, epoch: int) -> None:
        self._write(trainer)

    def on_fit_end(self, trainer) -> None:
        self._write(trainer)


def train_dense_stacked(jobs: list[DenseJob], options: RunOptions, wait_for_lock: bool = False) -> list[dict[str, Any]]:
    """Train dense jobs that differ only in their seed as ONE stacked network (lottery.engine.stacking),
    writing each member's run folder exactly as :func:`train_dense` does (hparams.json, metrics.csv,
    model.safetensors, results.json; a checkpoint per member, in the unstacked format), so resume and
    reports do not know the difference. Finished members are reused; members checkpointed at different
    steps, and networks the stacked path refuses (one line in the log), are trained one by one.
    Returns each job's results, in order."""
    from contextlib import ExitStack

    from lottery.engine.stacking import StackingError, checkpoint_iteration

    jobs = list(jobs)
    if not jobs:
        return []
    folders = [options.out / run_folder_name("train", j.data, j.model, j.training, seed=j.seed) for j in jobs]
    results: list[dict[str, Any] | None] = []
    for job, folder in zip(jobs, folders):
        desc = describe_run("train", job.seed, data=job.data, model=job.model, training=job.training)
        done = reuse_finished(folder, desc, options)
        if done is not None:
            remove_if_exists(folder / "checkpoint.safetensors")
        results.append(done)
    pending = [i for i, r in enumerate(results) if r is None]
    why = stack_refusal([jobs[i] for i in pending]) if len(pending) > 1 else None
    if len(pending) <= 1 or why is not None:
        if why is not None:
            log_line(options, f"stacking refused: {why}; training the {len(pending)} runs one by one")
        for i in pending:
            results[i] = train_dense(jobs[i], options, wait_for_lock=wait_for_lock)
        return results  # type: ignore[return-value]
    with ExitStack() as locks:
        for i in pending:
            locks.enter_context(folder_lock(folders[i], wait=wait_for_lock))
        for i in list(pending):
            finished = finished_results(folders[i] / "results.json", options)  # by a process we waited for
            if finished is not None:
                results[i] = finished
                pending.remove(i)
        # Members resume together only from checkpoints of one step; the others train alone.
        by_step: dict[int | None, list[int]] = {}
        for i in pending:
            by_step.setdefault(checkpoint_iteration(folders[i] / "checkpoint.safetensors"), []).append(i)
        for group in by_step.values():
            if len(group) == 1:
                results[group[0]] = _train_dense_locked(jobs[group[0]], folders[group[0]], options)
                continue
            try:
                out = _train_stack([jobs[i] for i in group], [folders[i] for i in group], options)
            except StackingError as e:
                log_line(options, f"stacking refused: {e}; training the {len(group)} runs one by one")
                out = [_train_dense_locked(jobs[i], folders[i], options) for i in group]
            for i, r in zip(group, out):
                results[i] = r
    return results  # type: ignore[return-value]


def _train_stack(jobs: list[DenseJob], folders: list[Path], options: RunOptions) -> list[dict[str, Any]]:
    """Train dense members of one stack, their folders locked; write each one's outputs."""
    from lottery.engine.stacking import StackedTrainer, stack, unstack_state

    first = jobs[0]
    bundle = load_data(first.data, options)
    members = [build_model(j.model, bundle, j.seed).to(options.device) for j in jobs]
    stacked = stack(members)  # refuses (StackingError) before anything is written
    train_loader, evals = make_loaders(bundle, first.training, first.seed, options)
    trainer = StackedTrainer(
        stacked, train_loader, first.training, eval_loaders=evals, device=options.device,
        checkpoint_paths=[f / "checkpoint.safetensors" for f in folders],
        callbacks=[StackedMetricsCSV([f / "metrics.csv" for f in folders], tensorboard=options.tensorboard)],
        progress=options.progress, desc="dense", log=options.log,
    )
    trainer.fit()
    k = len(jobs)
    out = []
    for i, (job, folder, member) in enumerate(zip(jobs, folders, members)):
        member.load_state_dict(unstack_state(stacked, i))
        out.append(_finish_dense(
            job, folder, member, final_row(trainer.member_histories[i]), trainer.step.epochs,
            # each member's share of the stack's time; the stack's own is beside it
            trainer.wall_seconds / k, bundle.input_shape,
            extra={"stack": {"size": k, "wall_seconds": trainer.wall_seconds}},
        ))
    return out
