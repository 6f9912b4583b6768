"""Models from outside lottery: a user's own modules (``--import MODULE``) and installed packages that
name a module in the ``lottery.models`` entry-point group.

Either kind registers its models as lottery's own do, with ``@register_model`` when its module is
imported. The modules imported with :func:`import_model_modules` are remembered so that a sweep passes
them on to its worker processes (:func:`imported_model_modules`), which must see the same models.
Entry points are read once, the first time a model name is looked up (``models.registry``), so a
package installed with ``pip`` needs no flag at all.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Iterable

from lottery.errors import ConfigError

ENTRY_POINT_GROUP = "lottery.models"

_IMPORTED: list[str] = []  # as given to import_model_modules, files resolved to absolute paths
_ENTRY_POINTS_LOADED = False


def _is_file(target: str) -> bool:
    return target.endswith(".py") or os.sep in target or "/" in target


def _import_one(target: str) -> str:
    """Import a module by dotted name (searched from the current folder first, as ``python -m`` does) or
    a ``.py`` file by path; returns what a worker process must import to get the same models."""
    if _is_file(target):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"--import {target}: no such file; give a module name (my_models) or the path of a .py file")
        name = f"lottery_user_{path.stem}"
        if name in sys.modules:
            return str(path)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"--import {target}: not a Python file that can be imported")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise ConfigError(f"--import {target} failed: {type(e).__name__}: {e}") from e
        return str(path)
    cwd = os.getcwd()
    if cwd not in sys.path:  # the console script's sys.path starts at its own folder, not the user's
        sys.path.insert(0, cwd)
    try:
        importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name and target.startswith(e.name):
            raise ConfigError(f"--import {target}: no module named {e.name!r} in {cwd} or on PYTHONPATH; run from "
                              "the folder that holds it, add that folder to PYTHONPATH, or give the .py file's path") from None
        raise ConfigError(f"--import {target} failed: {type(e).__name__}: {e}") from e
    except Exception as e:
        raise ConfigError(f"--import {target} failed: {type(e).__name__}: {e}") from e
    return target


def import_model_modules(targets: Iterable[str]) -> None:
    """Import each module (name or ``.py`` path), whose import registers its models."""
    for target in targets:
        done = _import_one(str(target))
        if done not in _IMPORTED:
            _IMPORTED.append(done)


def imported_model_modules() -> list[str]:
    """What :func:`import_model_modules` has imported in this process, for worker processes."""
    return list(_IMPORTED)


def load_entry_point_models() -> None:
    """Import every module named in the ``lottery.models`` entry-point group of the installed packages
    (once per process). An entry point may name a module or a function (``pkg.models:register``), which
    is then called with no arguments."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        package = ep.dist.name if getattr(ep, "dist", None) is not None else "?"
        try:
            loaded = ep.load()
            if callable(loaded) and not isinstance(loaded, type(sys)):
                loaded()
        except Exception as e:
            raise ConfigError(f"the {ENTRY_POINT_GROUP} entry point {ep.name!r} of the installed package {package} "
                              f"({ep.value}) failed to load: {type(e).__name__}: {e}; fix or uninstall that package") from e
