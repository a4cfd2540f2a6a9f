"""A small HTTP client for the CLI: Ollama's API at ACCORDION_HOST, errors as exceptions.

Kept free of torch and the server's modules so `accordion ps` starts in a blink.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx

from accordion.server.address import base_url

# loading a model can take seconds and an answer minutes: only connecting is time-limited
TIMEOUT = httpx.Timeout(None, connect=3.0)


class ServerError(Exception):
    """The server answered `{"error": ...}` (or an HTTP error without one)."""


class NoServerError(Exception):
    """Nothing answers at the configured address."""

    def __init__(self, url: str) -> None:
        super().__init__(
            f"could not connect to accordion at {url}; start it with `accordion serve`"
        )
        self.url = url


def _error_of(response: httpx.Response) -> ServerError:
    try:
        doc = response.json()
        message = doc.get("error") if isinstance(doc, dict) else None
    except ValueError:
        message = None
    if isinstance(message, dict):  # an OpenAI-shaped error object
        message = message.get("message")
    return ServerError(message or f"{response.status_code} {response.reason_phrase}")


class Client:
    def __init__(self, url: str | None = None) -> None:
        self.url = url or base_url()
        key = os.environ.get("ACCORDION_API_KEY")  # the server's own setting, if it has one
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.url, timeout=TIMEOUT, headers=headers)

    def close(self) -> None:
        self._http.close()

    def is_up(self) -> bool:
        try:
            return self._http.get("/", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The JSON reply (None for an empty body); ServerError / NoServerError otherwise."""
        try:
            response = self._http.request(method, path, json=body)
        except httpx.ConnectError:
            raise NoServerError(self.url) from None
        except httpx.HTTPError as e:
            raise ServerError(f"{type(e).__name__}: {e}") from None
        if response.status_code >= 400:
            raise _error_of(response)
        return response.json() if response.content else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, body)

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """NDJSON objects as they arrive; an `{"error": ...}` line raises ServerError."""
        try:
            with self._http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error_of(response)
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    doc = json.loads(line)
                    if isinstance(doc, dict) and "error" in doc:
                        raise ServerError(str(doc["error"]))
                    yield doc
        except httpx.ConnectError:
            raise NoServerError(self.url) from None
        except httpx.HTTPError as e:
            raise ServerError(f"{type(e).__name__}: {e}") from None
