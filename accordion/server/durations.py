"""Ollama-style durations: keep_alive as seconds or a Go duration string."""

from __future__ import annotations

import math
import re

from accordion.errors import InvalidRequestError

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")


def parse_keep_alive(value: str | int | float | None) -> float:
    """Seconds; negative means forever. Accepts 300, "300", "5m", "1h30m", "-1"."""
    if value is None:
        raise InvalidRequestError("keep_alive is missing")
    if isinstance(value, bool):
        raise InvalidRequestError("keep_alive must be a number of seconds or a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            return _parse_duration(value, text)
    if math.isnan(seconds):
        raise InvalidRequestError(f"invalid keep_alive duration {value!r} (e.g. '5m', '30s', -1)")
    return seconds


def _parse_duration(value: str, text: str) -> float:
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    parts = _PART.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise InvalidRequestError(f"invalid keep_alive duration {value!r} (e.g. '5m', '30s', -1)")
    return sign * sum(float(n) * _UNITS[u] for n, u in parts)
