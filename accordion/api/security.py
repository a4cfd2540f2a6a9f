"""Who may drive the server: Host names, browser origins, an optional API key.

The defaults follow Ollama's answer to DNS rebinding (CVE-2024-28224) and to
cross-site requests: bound to a loopback address, the server answers only Host
names that mean this machine; a browser Origin must be one of the local ones or
listed in ACCORDION_ORIGINS (comma-separated, `*` wildcards, as OLLAMA_ORIGINS).
ACCORDION_HOSTS adds Host names; ACCORDION_API_KEY requires
`Authorization: Bearer <key>` on every route but `/`, `/api/version` and the dashboard's files, as
vLLM's and llama.cpp's `--api-key` do.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field

LOCAL_ORIGINS = tuple(
    f"{scheme}://{host}{port}"
    for scheme in ("http", "https")
    for host in ("localhost", "127.0.0.1", "[::1]", "0.0.0.0")
    for port in ("", ":*")
) + ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")
LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
OPEN_PATHS = ("/", "/api/version")  # health checks work without the key
OPEN_PREFIX = "/dashboard"  # the page's static files; its data calls send the key


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _is_local_ip(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_unspecified


@dataclass
class Policy:
    loopback_only: bool = True  # bound to a loopback address: foreign Host names are refused
    hosts: list[str] = field(default_factory=list)  # extra Host names (ACCORDION_HOSTS)
    origins: list[str] = field(default_factory=list)  # extra origins (ACCORDION_ORIGINS)
    api_key: str | None = None

    @classmethod
    def from_env(cls, bind_host: str = "127.0.0.1") -> Policy:
        return cls(
            loopback_only=_binds_loopback(bind_host),
            hosts=[h.lower() for h in _split(os.environ.get("ACCORDION_HOSTS"))],
            origins=_split(os.environ.get("ACCORDION_ORIGINS")),
            api_key=os.environ.get("ACCORDION_API_KEY") or None,
        )

    def host_allowed(self, host_header: str | None) -> bool:
        """A Host name that means this machine (or a configured one)."""
        host = (host_header or "").strip().lower()
        if host.startswith("["):  # [::1]:11434
            host = host[: host.find("]") + 1]
        elif host.count(":") == 1:
            host = host.rpartition(":")[0]
        if self._listed(host, self.hosts):
            return True
        if not self.loopback_only:
            return True
        if host in ("", "localhost") or _is_local_ip(host) or host.endswith(LOCAL_SUFFIXES):
            return True
        return host == socket.gethostname().lower()

    def origin_allowed(self, origin: str) -> bool:
        return self._listed(origin, [*LOCAL_ORIGINS, *self.origins])

    def key_accepted(self, path: str, authorization: str | None) -> bool:
        if self.api_key is None or path in OPEN_PATHS or path.startswith(OPEN_PREFIX):
            return True
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )

    @staticmethod
    def _listed(value: str, patterns: list[str]) -> bool:
        return any(_wildcard(p).fullmatch(value) for p in patterns)


def _wildcard(pattern: str) -> re.Pattern[str]:
    """Only `*` is special (fnmatch would read `[::1]` as a character class)."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


def _binds_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name we cannot judge: behave as a public bind
