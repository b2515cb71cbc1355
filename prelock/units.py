"""Strict parsing and formatting of sizes (bytes) and durations (seconds)."""

from __future__ import annotations

import math
import re

_SIZE_UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)")
_PERCENT_RE = re.compile(r"(\d+(?:\.\d+)?)\s*%")


def parse_size(text: str) -> int:
    """Parse '4GiB', '512MiB', '100KiB' or a plain byte count into bytes.

    Raises ValueError naming the accepted units; decimal units (GB, MB) are rejected
    because operators mix them up with the binary ones. A number too large for a float
    also raises ValueError.
    """
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 512MiB or 4GiB (units: KiB, MiB, GiB, TiB), got {text!r}")
    size_bytes = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if not math.isfinite(size_bytes):
        shown = text.strip()
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise ValueError(f"size {shown!r} has too many digits; expected a size such as 512MiB or 4GiB")
    return int(size_bytes)


def parse_percent(text: str) -> float | None:
    """Return the fraction for '10%' (0.1), or None when text is not a percentage."""
    match = _PERCENT_RE.fullmatch(text.strip())
    if match is None:
        return None
    return float(match.group(1)) / 100.0


def parse_duration(text: str) -> float:
    """Parse '60s', '10m', '500ms' or '1h' into seconds."""
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected a duration such as 500ms, 60s, 10m or 1h, got {text!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def format_size(size_bytes: float) -> str:
    """Format bytes with a binary unit: 512B, 28.4MiB, 1.5GiB."""
    value = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TiB"
