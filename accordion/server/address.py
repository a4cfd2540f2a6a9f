"""ACCORDION_HOST parsing, shared by the server and the CLI (no heavy imports here)."""

from __future__ import annotations

import os

DEFAULT_HOST = "127.0.0.1:11434"


def host_port(value: str | None = None) -> tuple[str, int, str]:
    """('host:port', ':port', 'http://host:port', 'host') -> (host, port, scheme)."""
    text = (value or os.environ.get("ACCORDION_HOST") or DEFAULT_HOST).strip().rstrip("/")
    scheme = "https" if text.startswith("https://") else "http"
    text = text.removeprefix("http://").removeprefix("https://")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():  # 'localhost' alone: the whole text is the host
        host, port = text, "11434"
    return host or "127.0.0.1", int(port), scheme


def base_url(value: str | None = None) -> str:
    """A URL a client can reach; a listen-anywhere address is reached locally."""
    host, port, scheme = host_port(value)
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return f"{scheme}://{host}:{port}"
