"""Compiled trial definitions cached on disk, by the hash of everything they were built from.

Compiling the trials is most of a command's start-up: each FHIRPath condition is parsed by
fhirpathpy's ANTLR parser (about 0.1 s each), and checking the target units builds the unit
registry (about a second). :func:`load_compiled` returns the same trials and terminology as
:func:`fhirmatch.trials.load_trials` and :meth:`fhirmatch.terminology.Terminology.load`, and keeps
them (with the parsed conditions) in a cache file named by a SHA-256 over:

* the content and path of every trial file, every ValueSet/ConceptMap file and every file of the
  mapping tables (units and analytes);
* the versions of fhirmatch and Python; where fhirpathpy, pint and ucumvert are installed, with
  the size and modification time of each one's ``__init__.py`` (an upgrade or a reinstall
  rewrites it); and the size and modification time of every module of the ``fhirmatch``
  package (an edited checkout never reuses an old entry).

Any change gives a new key, so an entry is never stale; a definition that does not compile is
never cached (the error is raised as without the cache). The cache holds trial definitions and
terminology only, never patient data.

The same directory keeps the outcomes of unit conversions (:func:`load_unit_factors`), keyed by
the mapping tables, versions and modules: a run whose data uses units seen before converts them
without building the unit registry.

Where: ``$FHIRMATCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/fhirmatch``, else ``~/.cache/fhirmatch``;
``FHIRMATCH_CACHE=off`` turns it off. The directory is created owner-only (0700) and a cache file
is read only when this user owns it and nobody else can write it; an unreadable, corrupt or
unwritable cache is ignored (the trials are compiled as usual). At most :data:`KEEP` entries are
kept, the least recently written are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import logging
import os
import pickle
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .fhirpath import ParsedExpression
    from .model import Criterion, Trial
    from .terminology import Terminology

__all__ = ["KEEP", "cache_dir", "load_compiled", "load_unit_factors", "save_unit_factors"]

log = logging.getLogger(__name__)

#: entries kept in the cache directory
KEEP = 16
#: bump when the layout of an entry changes
_FORMAT = "fhirmatch-trials-1"


@dataclass(frozen=True)
class _Entry:
    trials: tuple[Trial, ...]
    terminology: Terminology
    parsed: tuple[ParsedExpression, ...]


def cache_dir() -> Path | None:
    """The cache directory, or None when caching is off."""
    if os.environ.get("FHIRMATCH_CACHE", "").lower() in ("off", "0", "no", "false"):
        return None
    explicit = os.environ.get("FHIRMATCH_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "fhirmatch"


def _files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file():
                    yield child
        else:
            yield path  # a missing file is reported by the real loader


def _installed(name: str) -> str:
    """What identifies the installed package ``name``, found without importing it (nor
    ``importlib.metadata``, which alone took about a twentieth of a cached start-up): its
    ``__init__.py``, with that file's size and modification time; ``?`` when not installed."""
    try:
        spec = importlib.machinery.PathFinder.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    origin = spec.origin if spec is not None else None
    if not origin:
        return f"{name} ?"
    try:
        st = os.stat(origin)
    except OSError:
        return f"{name} {origin}"
    return f"{name} {origin}:{st.st_size}:{st.st_mtime_ns}"


def _key(trial_paths: Sequence[str | os.PathLike[str]], term_paths: Sequence[Path]) -> str:
    from . import __version__
    from .trials import default_mappings_dir

    h = hashlib.sha256()

    def add(text: str) -> None:
        h.update(text.encode("utf-8", "surrogateescape") + b"\0")

    add(_FORMAT)
    add(__version__)
    for name in ("fhirpathpy", "pint", "ucumvert"):
        add(_installed(name))
    add(sys.version)
    package = Path(__file__).resolve().parent
    for module in sorted(package.rglob("*.py")):
        st = module.stat()
        add(f"{module.relative_to(package)}:{st.st_size}:{st.st_mtime_ns}")
    for label, group in (
        ("trials", trial_paths),
        ("terminology", term_paths),
        ("mappings", [default_mappings_dir()]),
    ):
        add(label)
        for file in _files(group):
            add(os.path.abspath(file))
            h.update(file.read_bytes())
    return h.hexdigest()


def _expressions(criteria: Iterable[Criterion]) -> Iterator[str]:
    for c in criteria:
        if c.expression:
            yield c.expression
        yield from _expressions(c.children)


def _trusted(path: Path) -> bool:
    """Only our own files that nobody else can write are unpickled."""
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _read(path: Path) -> _Entry | None:
    try:
        if not _trusted(path) or not _trusted(path.parent):
            log.debug("compiled-trial cache %s is not private; not used", path)
            return None
        with path.open("rb") as fh:
            entry = pickle.load(fh)  # noqa: S301 - our own owner-only file (checked above)
    except FileNotFoundError:
        return None
    except Exception as exc:  # a corrupt or foreign entry is ignored, never fatal
        log.debug("compiled-trial cache %s unreadable (%s); compiling", path, exc)
        return None
    return entry if isinstance(entry, _Entry) else None


def _write(folder: Path, path: Path, entry: _Entry) -> None:
    _write_pickle(folder, path, entry)


def _write_pickle(folder: Path, path: Path, entry: object) -> None:
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                pickle.dump(entry, fh, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        prefix = path.name.split("-", 1)[0]
        entries = sorted(folder.glob(f"{prefix}-*.pickle"), key=lambda p: p.stat().st_mtime)
        for old in entries[:-KEEP]:
            with contextlib.suppress(OSError):
                old.unlink()
    except OSError as exc:
        log.debug("compiled-trial cache not written (%s)", exc)


def load_compiled(
    trial_paths: Sequence[str | os.PathLike[str]],
    valueset_paths: Sequence[str | os.PathLike[str]] | None = None,
) -> tuple[list[Trial], Terminology]:
    """The compiled trials of ``trial_paths`` and the terminology they were compiled with.

    ``valueset_paths`` are the ValueSet/ConceptMap files or folders (default: the repository's
    ``mappings/``). Same results and errors as ``Terminology.load`` + ``load_trials``; from the
    cache when an entry for exactly these inputs exists.
    """
    from .fhirpath import parsed_expressions, remember_parsed
    from .terminology import Terminology
    from .trials import default_mappings_dir, load_trials

    term_paths = [Path(p) for p in valueset_paths or [default_mappings_dir()]]
    folder = cache_dir()
    path: Path | None = None
    if folder is not None:
        try:
            path = folder / f"trials-{_key(trial_paths, term_paths)[:40]}.pickle"
        except OSError:
            path = None  # an unreadable input: the loader reports it
    if path is not None:
        entry = _read(path)
        if entry is not None:
            remember_parsed(entry.parsed)
            log.debug("compiled trials from the cache (%s)", path.name)
            return list(entry.trials), entry.terminology
    terminology = Terminology.load(term_paths)
    trials = load_trials([Path(p) for p in trial_paths], terminology=terminology)
    if folder is not None and path is not None:
        parsed = parsed_expressions(e for t in trials for e in _expressions(t.criteria))
        _write(folder, path, _Entry(tuple(trials), terminology, tuple(parsed)))
    return trials, terminology


# --------------------------------------------------------------------------- unit conversions


def _factors_path() -> Path | None:
    folder = cache_dir()
    if folder is None:
        return None
    try:
        return folder / f"units-{_key([], [])[:40]}.pickle"
    except OSError:
        return None


def load_unit_factors() -> int:
    """Give :mod:`fhirmatch.units` the conversion outcomes an earlier run computed with the same
    unit definitions, mapping tables and code (the key is :func:`_key` without trials), so a run
    whose data uses only those units never builds the unit registry. Returns how many."""
    from . import units

    path = _factors_path()
    if path is None:
        return 0
    try:
        if not _trusted(path) or not _trusted(path.parent):
            return 0
        with path.open("rb") as fh:
            known = pickle.load(fh)  # noqa: S301 - our own owner-only file (checked above)
    except Exception:  # missing, corrupt or foreign: compute the conversions as usual
        return 0
    if not isinstance(known, dict):
        return 0
    units.remember_factors(known)
    return len(known)


def save_unit_factors() -> None:
    """Keep the conversion outcomes this process computed, with those known before."""
    from . import units

    table = units.learnt_factors()
    path = _factors_path()
    if not table.pop("new")["count"] or path is None:
        return
    _write_pickle(path.parent, path, table)
