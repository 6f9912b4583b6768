"""What the SIGKILL tests share: one ``faultkit.CLIProcesses`` per test module (a forkserver with lottery
and torch imported once, so each killed-and-resumed ``lottery`` process starts in milliseconds)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import faultkit as fk  # noqa: E402


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    p = fk.CLIProcesses(tmp_path_factory.mktemp("logs"))
    yield p
    import multiprocessing.forkserver as mf

    mf._forkserver._stop()
