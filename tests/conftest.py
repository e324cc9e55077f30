"""Shared fixtures.

Integration tests talk to a real FHIR server over HTTP: by default a local sandbox (sekmet-fhir on
127.0.0.1, a free port, loaded with the trial definitions and demo patients), started once per
test session; with ``FHIR_BASE_URL`` set, that server instead (it must already hold the fixtures,
e.g. loaded with ``fhirmatch trials publish`` and the demo patient bundles, or tests must create
their own data, as the client tests do).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fhirmatch.sandbox import SandboxHandle, start_sandbox

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _private_trial_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Compiled trials are cached in a directory of this test session, never the user's
    (subprocesses the tests start inherit it)."""
    saved = os.environ.get("FHIRMATCH_CACHE_DIR")
    os.environ["FHIRMATCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("trial-cache"))
    yield
    if saved is None:
        os.environ.pop("FHIRMATCH_CACHE_DIR", None)
    else:
        os.environ["FHIRMATCH_CACHE_DIR"] = saved


@pytest.fixture(autouse=True)
def _restore_fhirmatch_logger() -> Iterator[None]:
    """``fhirmatch.cli.main`` gives the ``fhirmatch`` logger its own stderr handler and turns
    propagation off, as a command-line run should; tests call it in-process, so restore the
    logger afterwards and later tests' ``caplog`` still sees fhirmatch logs."""
    logger = logging.getLogger("fhirmatch")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture(scope="session")
def sandbox() -> Iterator[SandboxHandle | None]:
    """The session's local sandbox, or None when ``FHIR_BASE_URL`` names another server."""
    if os.environ.get("FHIR_BASE_URL"):
        yield None
        return
    handle = start_sandbox(load=True)
    try:
        yield handle
    finally:
        if not handle.alive():
            print(f"\nthe sandbox died during the tests:\n{handle.log_tail()}")
        handle.stop()


@pytest.fixture(scope="session")
def fhir_base_url(sandbox: SandboxHandle | None) -> str:
    """Base URL of the FHIR server the integration tests use."""
    if sandbox is None:
        return os.environ["FHIR_BASE_URL"].rstrip("/")
    if not sandbox.alive():
        pytest.fail(f"the sandbox is not running:\n{sandbox.log_tail()}")
    return sandbox.base_url


@pytest.fixture(scope="session")
def is_local_sandbox(sandbox: SandboxHandle | None) -> bool:
    return sandbox is not None
