"""Models from outside lottery: ``--import MODULE`` (a module name or a .py file) and the
``lottery.models`` entry-point group of installed packages."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from lottery.errors import ConfigError, UnknownNameError
from lottery.models import build_model, get_model_spec, registry
from lottery.models import plugins
from lottery.models.plugins import import_model_modules, imported_model_modules


@pytest.fixture(autouse=True)
def _forget_user_modules(monkeypatch):
    """What these tests import and register stays in them: later sweeps would pass the modules on to
    their workers, and run folders would record them."""
    monkeypatch.setattr(plugins, "_IMPORTED", [])
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def _model_module(folder: Path, module: str, model: str) -> Path:
    path = folder / f"{module}.py"
    path.write_text(textwrap.dedent(f"""
        from torch import nn
        from lottery.models import register_model


        @register_model({model!r}, input_shape=(1, 8, 8))
        def build(input_shape, num_classes):
            c, h, w = input_shape
            return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 16), nn.ReLU(), nn.Linear(16, num_classes))
    """))
    return path


def test_a_module_name_is_found_from_the_current_folder(tmp_path, monkeypatch):
    tag = uuid.uuid4().hex[:8]
    _model_module(tmp_path, f"user_models_{tag}", f"mlp_{tag}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    with pytest.raises(UnknownNameError, match="--import MODULE"):
        get_model_spec(f"mlp_{tag}")
    import_model_modules([f"user_models_{tag}"])
    assert build_model(f"mlp_{tag}")[1].out_features == 16
    assert f"user_models_{tag}" in imported_model_modules()


def test_a_py_file_is_imported_by_path_and_remembered_absolute(tmp_path):
    tag = uuid.uuid4().hex[:8]
    path = _model_module(tmp_path, f"file_models_{tag}", f"mlp_file_{tag}")
    import_model_modules([str(path)])
    import_model_modules([str(path)])  # a second time changes nothing (no "registered twice")
    assert get_model_spec(f"mlp_file_{tag}").input_shape == (1, 8, 8)
    assert imported_model_modules().count(str(path.resolve())) == 1


@pytest.mark.parametrize("target,needle", [
    ("no_such_module_here", "no module named 'no_such_module_here'"),
    ("missing/file.py", "no such file"),
])
def test_a_bad_import_is_a_one_line_error(target, needle):
    with pytest.raises(ConfigError, match=needle):
        import_model_modules([target])


def test_a_module_that_fails_on_import_names_itself(tmp_path, monkeypatch):
    tag = uuid.uuid4().hex[:8]
    (tmp_path / f"broken_{tag}.py").write_text("raise RuntimeError('oops')\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"--import broken_{tag} failed: RuntimeError: oops"):
        import_model_modules([f"broken_{tag}"])


def test_installed_packages_register_through_the_entry_point_group(tmp_path):
    """A package installed with pip names its module in the lottery.models group: no flag needed."""
    site = tmp_path / "site"
    site.mkdir()
    _model_module(site, "plugpkg_models", "plugged_mlp")
    info = site / "plugpkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugpkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lottery.models]\nplugpkg = plugpkg_models\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "lottery", "models"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "plugged_mlp" in proc.stdout
