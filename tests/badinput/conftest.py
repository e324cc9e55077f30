"""Keep the ``fhirmatch`` logger as other tests expect it.

``fhirmatch.cli.main`` configures the ``fhirmatch`` logger for a command-line run (its own
stderr handler, no propagation to the root logger). Tests here call it in-process; this
fixture restores the logger afterwards so later tests' ``caplog`` still sees fhirmatch logs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _restore_fhirmatch_logger() -> Iterator[None]:
    logger = logging.getLogger("fhirmatch")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved
