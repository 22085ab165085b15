"""Byte sizes as people read them (shared by the GGUF tools and flashmoe's reports).

``format_size`` (whole units without decimals: ``512 MiB``, ``1.5 GiB``) is the one reports use;
``human_bytes`` (always two decimals: ``1.50 KiB``) is what progress bars, ``flashmoe inspect`` and
``flashmoe synth`` print.
"""
from __future__ import annotations

from typing import Optional, Union

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4


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


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'; exact bytes below 1 KiB."""
    n = float(n)
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024.0
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}"
    return f"{n:.2f} TiB"  # pragma: no cover
