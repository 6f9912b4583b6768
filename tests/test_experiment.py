"""Run folders: names pinned by hparams hashes, stable when new defaulted fields appear; the lock."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lottery.errors import ConfigError, LotteryError
from lottery.experiment import folder_lock, prepare_run_folder, run_folder_name
from lottery.hparams import DataHparams, Hparams, ModelHparams, TrainingHparams, hparams_hash
from lottery.methods.cs import CSHparams


def test_pinned_folder_names():
    """These names are on users' disks: changing them orphans every existing run."""
    d, m, t = DataHparams(), ModelHparams(), TrainingHparams()
    assert run_folder_name("train", d, m, t) == "train_lenet_300_100_fashion-mnist_s0_44136fa355"
    assert run_folder_name("train", d, m, t, seed=1) == "train_lenet_300_100_fashion-mnist_s1_7f0427d132"
    t40 = TrainingHparams(training_steps="40ep", lr=0.05, momentum=0.9)
    assert hparams_hash(d, m, t40) == "71d86a92f1"
    cs = CSHparams(s0=-0.05, rounds=3, round_steps="20ep", rewind="1ep")
    assert run_folder_name("search-cs", d, m, t, cs) == "search-cs_lenet_300_100_fashion-mnist_s0_a2ac35ff0d"


def test_pinned_hash_values():
    assert hparams_hash(TrainingHparams(lr=0.05)) == _expected_lr_hash()


def _expected_lr_hash() -> str:
    import hashlib
    import json

    payload = {"TrainingHparams": {"lr": 0.05}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:10]


def test_new_field_with_default_keeps_names():
    """Adding an hparam with a default must not rename existing run folders."""
    fields = [(f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(TrainingHparams)]
    Extended = dataclasses.make_dataclass(
        "TrainingHparams", fields + [("brand_new_option", int, dataclasses.field(default=7))], bases=(Hparams,), frozen=True
    )
    old = TrainingHparams(lr=0.05, training_steps="3ep")
    new = Extended(lr=0.05, training_steps="3ep")
    assert hparams_hash(old) == hparams_hash(new)
    assert hparams_hash(Extended(lr=0.05, training_steps="3ep", brand_new_option=8)) != hparams_hash(old)


def test_changed_hparams_change_the_name():
    d, m = DataHparams(), ModelHparams()
    assert run_folder_name("train", d, m, TrainingHparams()) != run_folder_name("train", d, m, TrainingHparams(lr=0.05))


def _create(path, description):
    """A run folder as a run makes it: checked, then created when the run takes its lock."""
    prepare_run_folder(path, description)
    with folder_lock(path):
        pass
    return path


def test_folder_with_other_hparams_is_refused(tmp_path):
    _create(tmp_path / "run", {"kind": "train", "training": {"lr": 0.1}})
    prepare_run_folder(tmp_path / "run", {"kind": "train", "training": {"lr": 0.1}})  # same: fine
    with pytest.raises(ConfigError, match=r"training.lr: 0.1 there, 0.2 now"):
        prepare_run_folder(tmp_path / "run", {"kind": "train", "training": {"lr": 0.2}})


def test_folder_written_before_a_new_field_existed_is_still_reused(tmp_path):
    """A field added later is missing from an older folder's hparams.json: at None (not used) it matches;
    set to anything else, or a field the folder has and this run does not, it does not."""
    _create(tmp_path / "run", {"kind": "stability", "stability": {"mask": None, "points": 30}})
    prepare_run_folder(tmp_path / "run", {"kind": "stability", "stability": {"mask": None, "points": 30,
                                                                             "start_state": None}})
    with pytest.raises(ConfigError, match=r"stability.start_state: '<missing>' there, 'a.safetensors' now"):
        prepare_run_folder(tmp_path / "run", {"kind": "stability", "stability": {"mask": None, "points": 30,
                                                                                 "start_state": "a.safetensors"}})
    with pytest.raises(ConfigError, match=r"stability.mask: None there, '<missing>' now"):
        prepare_run_folder(tmp_path / "run", {"kind": "stability", "stability": {"points": 30}})


def test_second_process_on_same_folder_gets_a_clear_error(tmp_path):
    import multiprocessing as mp

    (tmp_path / "run").mkdir()
    ctx = mp.get_context("spawn")
    with folder_lock(tmp_path / "run"):
        q = ctx.Queue()
        p = ctx.Process(target=_try_lock, args=(str(tmp_path / "run"), q))
        p.start()
        p.join(60)
        assert "another process is already running" in q.get(timeout=5)
    # Released: a later process gets it.
    q = ctx.Queue()
    p = ctx.Process(target=_try_lock, args=(str(tmp_path / "run"), q))
    p.start()
    p.join(60)
    assert q.get(timeout=5) == "locked"


def _try_lock(path: str, q) -> None:
    from pathlib import Path

    try:
        with folder_lock(Path(path)):
            q.put("locked")
    except LotteryError as e:
        q.put(str(e))


def test_a_new_run_folder_records_which_lottery_wrote_it_and_a_mismatch_names_it(tmp_path):
    import subprocess

    from lottery import __version__
    from lottery.errors import ConfigError
    from lottery.experiment import PROVENANCE_FILE, prepare_run_folder, provenance
    from lottery.io import read_json, write_json

    folder = _create(tmp_path / "run", {"kind": "train", "seed": 0})
    info = read_json(folder / PROVENANCE_FILE)
    assert info["lottery_version"] == __version__ and info == provenance()
    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # run from a clone: the commit is recorded
        assert info["git_commit"] == head.stdout.strip()
    with pytest.raises(ConfigError, match=rf"written by lottery {__version__}"):
        prepare_run_folder(folder, {"kind": "train", "seed": 1})
    (folder / PROVENANCE_FILE).unlink()  # a folder from before lottery recorded its version
    with pytest.raises(ConfigError, match="recorded none"):
        prepare_run_folder(folder, {"kind": "train", "seed": 1})
    write_json(folder / PROVENANCE_FILE, {"lottery_version": "0.0.9", "git_commit": "abcdef1234567", "git_dirty": True})
    with pytest.raises(ConfigError, match=r"written by lottery 0\.0\.9 \(commit abcdef1234, modified\)"):
        prepare_run_folder(folder, {"kind": "train", "seed": 1})


def test_a_run_folder_records_the_threads_and_cpu_that_decide_bit_for_bit_reproduction(tmp_path):
    """Two runs of one seed agree bit for bit only with the same torch threads and CPU kernels, so a
    folder says which it was made with (the thread count as set when it was created)."""
    from lottery.experiment import PROVENANCE_FILE, cpu_name
    from lottery.io import read_json

    before = torch.get_num_threads()
    try:
        for threads, name in ((1, "one"), (2, "two")):
            torch.set_num_threads(threads)
            folder = _create(tmp_path / name, {"kind": "train", "seed": 0})
            info = read_json(folder / PROVENANCE_FILE)
            assert info["torch_threads"] == threads
            assert info["cpu"] == cpu_name()
    finally:
        torch.set_num_threads(before)
    if Path("/proc/cpuinfo").exists():
        assert cpu_name()  # Linux always names its CPU model


def test_the_commit_recorded_is_read_at_import_not_when_a_folder_is_made():
    """A long sweep's workers outlive a commit or a pull: the folder must name the code that runs, so git
    is asked when lottery is imported and never again (checked in a fresh interpreter, where nothing has
    asked before: after the import, git is made unavailable)."""
    import json
    import subprocess
    import sys

    script = (
        "import json, subprocess\n"
        "import lottery.experiment as e\n"
        "def no_git(*a, **k):\n"
        "    raise OSError('git asked after import')\n"
        "subprocess.run = no_git\n"
        "print(json.dumps({**e.provenance(), 'module': e.__file__}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0 and Path(info["module"]).resolve().is_relative_to(repo / "src"):  # from a clone
        assert info.get("git_commit") == head.stdout.strip()


def test_a_checked_folder_is_created_only_when_its_run_starts_and_removed_if_it_fails_at_once(tmp_path):
    """A settings error found after the folder was checked (a rewind point after the end, missing data)
    leaves nothing that ``lottery report`` would list as a run in progress."""
    run = tmp_path / "run"
    prepare_run_folder(run, {"kind": "train", "seed": 0})
    assert not run.exists()
    with pytest.raises(ConfigError):
        with folder_lock(run):
            assert (run / "hparams.json").is_file()
            raise ConfigError("found out too late")
    assert not run.exists()
    # a run that wrote something of its own keeps its folder (it resumes from there)
    prepare_run_folder(run, {"kind": "train", "seed": 0})
    with pytest.raises(KeyboardInterrupt):
        with folder_lock(run):
            (run / "checkpoint.safetensors").write_bytes(b"x")
            raise KeyboardInterrupt
    assert (run / "hparams.json").is_file() and (run / "checkpoint.safetensors").is_file()
