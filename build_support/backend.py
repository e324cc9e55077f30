"""The build backend: setuptools' own, except that ``FHIRMATCH_COMPILE=1`` (the compiled build,
see ``setup.py``) applies to wheels only.

* A wheel built with ``FHIRMATCH_COMPILE=1`` needs mypy, and fhirmatch's dependencies so that
  mypyc sees their types: they are added to its build requirements.
* Everything else is built as pure Python whatever the variable says: the sdist (it is source),
  the metadata (the same for both builds), and editable installs (a compiled module in the
  checkout would hide later edits to its ``.py`` file).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 - the hooks not redefined below

#: the mypy (and so mypyc) of a compiled build; the C it generates depends on its version
MYPY = "mypy==2.4.1"
_FLAG = "FHIRMATCH_COMPILE"


def _compiling() -> bool:
    return os.environ.get(_FLAG, "").strip() == "1"


def _pure(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` run with the compiled build switched off."""

    def run(*args: Any, **kwargs: Any) -> Any:
        saved = os.environ.get(_FLAG)
        os.environ[_FLAG] = "0"
        try:
            return hook(*args, **kwargs)
        finally:
            if saved is None:
                del os.environ[_FLAG]
            else:
                os.environ[_FLAG] = saved

    run.__name__ = hook.__name__
    return run


def get_requires_for_build_wheel(config_settings: Any = None) -> list[str]:
    requires: list[str] = _pure(_setuptools.get_requires_for_build_wheel)(config_settings)
    if _compiling():
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
        requires = [*requires, MYPY, *project["dependencies"]]
    return requires


prepare_metadata_for_build_wheel = _pure(_setuptools.prepare_metadata_for_build_wheel)
get_requires_for_build_sdist = _pure(_setuptools.get_requires_for_build_sdist)
build_sdist = _pure(_setuptools.build_sdist)
get_requires_for_build_editable = _pure(_setuptools.get_requires_for_build_editable)
prepare_metadata_for_build_editable = _pure(_setuptools.prepare_metadata_for_build_editable)
build_editable = _pure(_setuptools.build_editable)
