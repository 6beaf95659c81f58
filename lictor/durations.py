"""Go-style durations ("10s", "1m30s", "100ms"), as Consul's API speaks them."""

from __future__ import annotations

import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


class DurationError(ValueError):
    pass


def parse_duration(value: object) -> float:
    """Seconds from a Go duration string, or from a JSON number of nanoseconds (Consul's rule)."""
    if isinstance(value, bool):
        raise DurationError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise DurationError(f"negative duration {value!r}")
        return float(value) / 1e9
    if not isinstance(value, str):
        raise DurationError(f"invalid duration {value!r}")
    text = value.strip()
    if text in ("", "0"):
        return 0.0
    sign = 1.0
    if text[0] in "+-":
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    pos, total = 0, 0.0
    while pos < len(text):
        match = _PART.match(text, pos)
        if not match:
            raise DurationError(f"invalid duration {value!r}")
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if sign < 0 and total > 0:
        raise DurationError(f"negative duration {value!r}")
    return total


def format_duration(seconds: float) -> str:
    """The Go `time.Duration.String()` rendering, enough for intervals: 10s, 1m30s, 500ms."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        ms = seconds * 1000
        return f"{ms:g}ms" if ms >= 1 else f"{seconds * 1e6:g}µs"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = ""
    if hours:
        out += f"{int(hours)}h"
    if hours or minutes:
        out += f"{int(minutes)}m"
    out += f"{secs:g}s"
    return out
