"""Typed values for command-line flags, shared with the configuration file.

A flag declares its type once, with ``type=`` in ``add_argument``: ``int``, ``float``, ``Path``,
``str``, or one of the callables here, which also carry a range (:class:`Number`) or a format
(:class:`IsoDate`). :mod:`fhirmatch.cli.config` reads the same declarations to build the schema
that checks a ``--config`` TOML file, so a flag added to a command is validated in the file too,
with the same types, choices and ranges.
"""

from __future__ import annotations

import argparse
import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True)
class Number:
    """An ``int`` or ``float`` flag value within bounds; usable as ``add_argument(type=...)``.

    ``ge``/``le`` are inclusive bounds, ``gt`` an exclusive lower bound.
    """

    kind: type[int] | type[float]
    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    @property
    def __name__(self) -> str:  # argparse names the type in its error messages
        return self.kind.__name__

    def expected(self) -> str:
        """What a valid value is, in words: ``an integer >= 1``."""
        noun = "an integer" if self.kind is int else "a number"
        bounds = []
        if self.ge is not None:
            bounds.append(f">= {_num(self.ge)}")
        if self.gt is not None:
            bounds.append(f"> {_num(self.gt)}")
        if self.le is not None:
            bounds.append(f"<= {_num(self.le)}")
        return f"{noun} {' and '.join(bounds)}".strip()

    def check(self, value: int | float) -> int | float:
        """``value`` if it is within the bounds; ValueError naming what is expected otherwise."""
        if (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
        ):
            raise ValueError(f"expected {self.expected()}, got {value}")
        return value

    def __call__(self, text: str) -> int | float:
        try:
            return self.check(self.kind(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.expected()}, got {text!r}") from None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


class IsoDate:
    """A ``YYYY-MM-DD`` flag value, parsed to a :class:`datetime.date`."""

    __name__ = "date"

    def expected(self) -> str:
        return "a date YYYY-MM-DD"

    def __call__(self, text: str) -> dt.date:
        try:
            return dt.date.fromisoformat(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


iso_date = IsoDate()

positive_int = Number(int, ge=1)
positive_float = Number(float, gt=0)
non_negative_float = Number(float, ge=0)
port_number = Number(int, ge=0, le=65535)
