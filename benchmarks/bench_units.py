"""Measure fhirmatch.units.convert throughput on the hot path (cached unit-pair factors).

Run: ``.venv/bin/python benchmarks/bench_units.py``. Prints calls per second for a mix of
conversions the engine makes (counts, mass <-> molar, enzyme IU/L), plus the cost of the first
(uncached) parse of a unit pair.
"""

from __future__ import annotations

import time

from fhirmatch.units import _cached_factor, convert, parse_value_string

PAIRS = [
    ("mg/dL", "umol/L", "creatinine"),
    ("10*9/L", "10*3/uL", None),
    ("K/uL", "10*9/L", None),
    ("g/dL", "g/L", None),
    ("IU/L", "U/L", "alt"),
    ("umol/L", "mg/dL", "bilirubin-total"),
]


def main() -> None:
    start = time.perf_counter()
    for src, dst, analyte in PAIRS:
        convert(1.0, src, dst, analyte=analyte)
    first = time.perf_counter() - start
    print(f"first conversion of {len(PAIRS)} pairs (registry build + parse): {first * 1000:.1f} ms")

    _cached_factor.cache_clear()
    start = time.perf_counter()
    for src, dst, analyte in PAIRS:
        convert(1.0, src, dst, analyte=analyte)
    uncached = (time.perf_counter() - start) / len(PAIRS)
    print(f"uncached pair (units already parsed): {uncached * 1e6:.0f} µs per pair")

    n = 1_000_000
    start = time.perf_counter()
    for i in range(n):
        src, dst, analyte = PAIRS[i % len(PAIRS)]
        convert(float(i), src, dst, analyte=analyte)
    elapsed = time.perf_counter() - start
    print(f"convert (cached): {n / elapsed:,.0f} calls/s ({elapsed / n * 1e9:.0f} ns per call)")

    texts = ["12.3", "<0.5", "1,5 x10^9/L", "positive", ">= 1000 IU/mL"]
    n = 100_000
    start = time.perf_counter()
    for i in range(n):
        parse_value_string(texts[i % len(texts)])
    elapsed = time.perf_counter() - start
    print(f"parse_value_string: {n / elapsed:,.0f} calls/s")


if __name__ == "__main__":
    main()
