"""Where fhirmatch's own data lives: the mapping tables, the seed trials and the demo patients.

The source of truth is three folders of the repository: ``mappings/`` (ValueSets, ConceptMaps,
unit aliases, analytes, licences), ``fixtures/trials/`` and ``fixtures/patients/``. Building the
wheel copies each of them, whole, into the package as ``fhirmatch/_data/mappings``,
``fhirmatch/_data/trials`` and ``fhirmatch/_data/patients`` (``setup.py``), so an installed
fhirmatch finds them through :mod:`importlib.resources` wherever it runs from. A checkout or an
editable install has no ``_data``: there the top-level folders are read directly.

``$FHIRMATCH_MAPPINGS`` replaces the mapping tables and ``$FHIRMATCH_TRIALS`` (several paths
separated by ``os.pathsep``) the default trials. A folder that cannot be found raises
:class:`~fhirmatch.errors.DataFileError`, a configuration error (the CLI exits 2 with one line).
"""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path
from typing import Literal

from .errors import DataFileError

__all__ = [
    "BUNDLE_FOLDERS",
    "PACKAGE_DATA",
    "Kind",
    "bundled_dir",
    "default_trial_paths",
    "demo_patients_dir",
    "mappings_dir",
    "seed_trials_dir",
]

Kind = Literal["mappings", "trials", "patients"]

#: each kind of bundled data -> its source folder in the repository (relative to the root)
BUNDLE_FOLDERS: dict[str, tuple[str, ...]] = {
    "mappings": ("mappings",),
    "trials": ("fixtures", "trials"),
    "patients": ("fixtures", "patients"),
}
_DESCRIPTION = {
    "mappings": "mapping tables",
    "trials": "seed trials",
    "patients": "demo patients",
}
#: the folder inside the package that the wheel build fills from :data:`BUNDLE_FOLDERS`
PACKAGE_DATA = "_data"


def bundled_dir(kind: Kind) -> Path:
    """The folder of one kind of bundled data, ``"mappings"``, ``"trials"`` or ``"patients"``.

    In an installed wheel it is the package's ``_data/<kind>`` (found with
    :func:`importlib.resources.files`); in a checkout or an editable install, the repository's
    top-level folder. Environment overrides are not applied here (see :func:`mappings_dir` and
    :func:`default_trial_paths`). Raises :class:`DataFileError` when neither exists.
    """
    if kind not in BUNDLE_FOLDERS:
        raise ValueError(f"unknown kind of bundled data: {kind!r}")
    return _find_bundled(kind)


@functools.cache
def _find_bundled(kind: Kind) -> Path:
    """:func:`bundled_dir`'s look-up, once per kind: the package does not move while it runs,
    and unit conversions ask for the mapping tables on the hot path."""
    package = resources.files(__package__ or "fhirmatch")
    packaged = package.joinpath(PACKAGE_DATA, kind)
    if packaged.is_dir():
        if not isinstance(packaged, Path):
            # pip always unpacks wheels; only a zip import (zipapp, egg) gets here
            raise DataFileError(
                f"fhirmatch's {_DESCRIPTION[kind]} are inside an archive ({packaged}); "
                "install fhirmatch with pip so they are files"
            )
        return packaged
    root = Path(str(package)).resolve().parent
    source = root.joinpath(*BUNDLE_FOLDERS[kind])
    # the repository layout: pyproject.toml beside the package, the folder under it
    if source.is_dir() and (root / "pyproject.toml").is_file():
        return source
    raise DataFileError(
        f"fhirmatch's {_DESCRIPTION[kind]} are missing: neither {packaged} nor {source} "
        "is a folder; reinstall fhirmatch"
    )


def mappings_dir() -> Path:
    """The mapping tables: ``$FHIRMATCH_MAPPINGS`` if set, else the bundled ``mappings/``.

    Raises :class:`DataFileError` when ``$FHIRMATCH_MAPPINGS`` is not a folder.
    """
    override = os.environ.get("FHIRMATCH_MAPPINGS")
    if override:
        path = Path(override)
        if not path.is_dir():
            raise DataFileError(f"FHIRMATCH_MAPPINGS={override} is not a folder")
        return path
    return bundled_dir("mappings")


def seed_trials_dir() -> Path:
    """The bundled seed trials (one Bundle file per trial)."""
    return bundled_dir("trials")


def demo_patients_dir() -> Path:
    """The bundled demo patients (one Bundle file per patient)."""
    return bundled_dir("patients")


def default_trial_paths() -> list[Path]:
    """The trials read when none are given: ``$FHIRMATCH_TRIALS`` (``os.pathsep``-separated
    files or folders) if set, else ``[seed_trials_dir()]``."""
    env = os.environ.get("FHIRMATCH_TRIALS")
    if env:
        paths = [Path(p) for p in env.split(os.pathsep) if p]
        if paths:
            return paths
    return [seed_trials_dir()]
