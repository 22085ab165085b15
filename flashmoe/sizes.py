"""Byte sizes: parsing ("8GiB", "8 GB", "512MiB", "1.5G", "4096") and formatting ("1.5 GiB").

Units (case-insensitive, an optional space between number and unit):

* binary (IEC): ``KiB MiB GiB TiB PiB`` = 1024, 1024**2, ...
* decimal (SI): ``kB KB MB GB TB PB`` = 1000, 1000**2, ...
* one letter:   ``K M G T P`` = binary, as in ``ls -h``, ``sort -S`` or docker (``8G`` == ``8GiB``)
* ``B`` or no unit: bytes.

Fractions are allowed (``1.5G``); the result is rounded down to whole bytes.
"""
from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Optional, Union

import click

from flashmoe.errors import UsageError

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

from gguf_tools.units import format_size  # noqa: E402,F401  (re-exported)

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
    "p": 1024**5, "pib": 1024**5, "pb": 1000**5,
}

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?\s*([A-Za-z]*)\s*$")

SIZE_HELP = "a size such as 8GiB, 512MiB, 1.5G, 8 GB or a number of bytes"

# The largest size accepted (1 EiB): anything above is a typo or an attack, and would overflow the
# 64-bit sizes of the C side.
MAX_SIZE = 1 << 60
_MAX_TEXT = 64  # characters of a size string


class SizeError(UsageError, ValueError):
    """A size string that does not parse (a user error: the CLI prints one line)."""


def parse_size(value: Union[str, int, float], what: Optional[str] = None) -> int:
    """Parse a size into bytes. Accepts int (bytes), float (bytes, rounded down) or a string.

    Raises SizeError (a UsageError and a ValueError) with a message naming ``what`` when given.
    """
    prefix = f"{what}: " if what else ""
    too_large = f"{prefix}size {value!r} is too large (at most 1 EiB)"
    if isinstance(value, bool):
        raise SizeError(f"{prefix}expected {SIZE_HELP}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise SizeError(f"{prefix}size must not be negative, got {value}")
        if value > MAX_SIZE:
            raise SizeError(too_large if len(str(value)) <= 30 else f"{prefix}size is too large (at most 1 EiB)")
        return value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value) or value < 0:
            raise SizeError(f"{prefix}expected {SIZE_HELP}, got {value!r}")
        if value > MAX_SIZE:
            raise SizeError(too_large)
        return int(value)
    if not isinstance(value, str):
        raise SizeError(f"{prefix}expected {SIZE_HELP}, got {type(value).__name__} {_short(value)}")
    if len(value) > _MAX_TEXT:
        raise SizeError(f"{prefix}cannot parse size {_short(value)} (expected {SIZE_HELP})")
    m = _SIZE_RE.match(value)
    if not m:
        raise SizeError(f"{prefix}cannot parse size {value!r} (expected {SIZE_HELP})")
    number, exponent, unit = m.groups()
    mult = _UNITS.get(unit.lower())
    if mult is None:
        raise SizeError(
            f"{prefix}cannot parse size {value!r}: unknown unit {unit!r} "
            f"(use B, KiB, MiB, GiB, TiB, K, M, G, T, kB, MB, GB or TB)"
        )
    # exact arithmetic (no float overflow for 1e400, no rounding for 1.5G); the exponent is bounded
    # first so that 1e999999999 costs nothing
    exp = int(exponent or 0)
    x = Fraction(number)
    if x == 0:
        return 0
    if exp > 40:
        raise SizeError(too_large)
    if exp < -40:
        return 0  # rounds down to 0 bytes
    x = x * Fraction(10) ** exp * mult
    if x > MAX_SIZE:
        raise SizeError(too_large)
    return int(x)  # rounded down to whole bytes


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


# format_size lives with the GGUF tools (they print sizes too); flashmoe uses it from here


class SizeParamType(click.ParamType):
    """A click parameter type for sizes: ``@click.option("--budget", type=SIZE)``."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return parse_size(value)
        except SizeError as e:
            self.fail(str(e), param, ctx)


SIZE = SizeParamType()
