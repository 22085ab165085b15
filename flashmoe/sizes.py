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
from typing import Optional, Union

import click

from flashmoe.errors import UsageError

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

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


class SizeError(UsageError, ValueError):
    """A size string that does not parse (a user error: the CLI prints one line)."""


def parse_size(value: Union[str, int, float], what: Optional[str] = None) -> int:
    """Parse a size into bytes. Accepts int (bytes), float (bytes, rounded down) or a string.

    Raises SizeError (a UsageError and a ValueError) with a message naming ``what`` when given.
    """
    prefix = f"{what}: " if what else ""
    if isinstance(value, bool):
        raise SizeError(f"{prefix}expected {SIZE_HELP}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise SizeError(f"{prefix}size must not be negative, got {value}")
        return value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value) or value < 0:
            raise SizeError(f"{prefix}expected {SIZE_HELP}, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise SizeError(f"{prefix}expected {SIZE_HELP}, got {type(value).__name__} {value!r}")
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
    if exponent is None and "." not in number:
        return int(number) * mult  # exact for integers of any size
    x = float(number) * (10 ** int(exponent or 0)) * mult
    if math.isinf(x):
        raise SizeError(f"{prefix}size {value!r} is too large")
    return int(x)


def format_size(n: Optional[Union[int, float]], precision: int = 1) -> str:
    """Format bytes with binary units: 0 B, 812 B, 4.0 KiB, 512 MiB, 1.5 GiB, 2.00 TiB.

    Whole numbers of a unit print without decimals (``512 MiB``); otherwise ``precision`` decimals.
    ``None`` prints as ``-``. Negative values keep their sign.
    """
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n < 1024:
        return f"{sign}{int(n)} B"
    for unit, mult in (("KiB", KiB), ("MiB", MiB), ("GiB", GiB), ("TiB", TiB)):
        if n < mult * 1024 or unit == "TiB":
            v = n / mult
            if n % mult == 0:
                return f"{sign}{int(v)} {unit}"
            s = f"{v:.{precision}f}"
            if float(s) >= 1024 and unit != "TiB":
                continue  # 1023.96 MiB rounds to 1024.0: use the next unit
            return f"{sign}{s} {unit}"
    raise AssertionError("unreachable")


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
