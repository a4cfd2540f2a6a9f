"""A tiny random-weight model whose chat template offers tools, and a server that runs it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from live_server import LiveServer
from tiny_gguf import TOOLS_TEMPLATE, TinySpec, write_tiny


@pytest.fixture(scope="session")
def tool_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tools") / "tools.gguf"
    return write_tiny(path, TinySpec(chat_template=TOOLS_TEMPLATE))


@pytest.fixture(scope="session")
def live(tool_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server that may load the tiny model by its path."""
    server = LiveServer(
        tmp_path_factory.mktemp("models"), env={"ACCORDION_ALLOW_PATHS": str(tool_model.parent)}
    )
    yield server
    server.stop()
