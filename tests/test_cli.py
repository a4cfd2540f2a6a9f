"""The `accordion` CLI end to end: subprocesses against a live server, and without one.

Determinism: `run` has no --temperature (as in Ollama), so answers checked for content
come from a model created with PARAMETER temperature 0, or from a REPL script that
starts with `/set parameter temperature 0`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer, free_port

from accordion.cli.main import human_bytes, resolve_from
from accordion.cli.repl import go_duration, inputs, is_script, script_reader
from accordion.server.store import ModelStore

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-models")


@pytest.fixture(scope="module")
def server(models_dir: Path) -> Iterator[LiveServer]:
    live = LiveServer(models_dir)
    yield live
    live.stop()


def cli(
    *args: str, host: str, models: Path, stdin: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ACCORDION_HOST": host, "ACCORDION_MODELS": str(models)}
    env.pop("ACCORDION_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "accordion", *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


@pytest.fixture(scope="module")
def run_cli(server: LiveServer, models_dir: Path):  # noqa: ANN201
    def run(*args: str, stdin: str | None = None, cwd: Path | None = None):  # noqa: ANN202
        return cli(*args, host=server.url, models=models_dir, stdin=stdin, cwd=cwd)

    return run


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def load(server: LiveServer, model: str) -> None:
    httpx.post(server.url + "/api/generate", json={"model": model}, timeout=120).raise_for_status()


def running(server: LiveServer) -> list[str]:
    return [m["name"] for m in httpx.get(server.url + "/api/ps").json()["models"]]


# -- without a server ------------------------------------------------------------------
def test_run_without_server_answers_in_process(tmp_path: Path) -> None:
    ModelStore(tmp_path).create("greedy", "smollm2", {"temperature": 0})
    closed = f"127.0.0.1:{free_port()}"
    result = cli("run", "greedy", QUESTION, "--verbose", host=closed, models=tmp_path)
    assert "Paris" in ok(result)
    for line in ("total duration:", "prompt eval count:", "prompt cache count:", "eval rate:"):
        assert line in result.stderr  # Ollama's --verbose summary goes to stderr


def test_commands_needing_a_server_say_how_to_start_one(tmp_path: Path) -> None:
    result = cli("ps", host=f"127.0.0.1:{free_port()}", models=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: could not connect to accordion at http://127.0.0.1:")
    assert "accordion serve" in result.stderr and "Traceback" not in result.stderr


# -- with the server -------------------------------------------------------------------
def test_list_shows_the_bundled_model(run_cli) -> None:  # noqa: ANN001
    out = ok(run_cli("list")).splitlines()
    assert out[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert any(line.startswith("smollm2:latest ") for line in out[1:])


def test_unknown_model_is_an_error(run_cli) -> None:  # noqa: ANN001
    for args in (["run", "no-such-model", "hi"], ["show", "no-such-model"]):
        result = run_cli(*args)
        assert result.returncode == 1
        assert result.stderr.startswith("Error:") and "no-such-model" in result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""


def test_ps_verbose_shows_the_kv_cache(run_cli, server: LiveServer) -> None:  # noqa: ANN001
    load(server, "smollm2")
    lines = ok(run_cli("ps", "-v")).splitlines()
    assert lines[0].split() == [
        "NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL",
        "ALLOCATED", "USED", "CACHED", "ACTIVE", "RAM",
    ]  # fmt: skip
    row = next(line for line in lines if line.startswith("smollm2:latest "))
    assert "100% CPU" in row and "from now" in row
    plain = ok(run_cli("ps")).splitlines()
    assert "ALLOCATED" not in plain[0] and any(r.startswith("smollm2:latest ") for r in plain)


def test_repl_script_from_stdin(run_cli) -> None:  # noqa: ANN001
    script = "\n".join(
        [
            "/set parameter temperature 0",
            "/set parameter num_predict 40",
            QUESTION,
            "/show parameters",
            "/clear",
            '"""Answer with one word:',
            'what is the capital of Italy?"""',
            "/bye",
            "this line is never sent",
        ]
    )
    out = ok(run_cli("run", "smollm2", stdin=script + "\n"))
    assert "Set parameter 'temperature' to '0'" in out
    assert "Paris" in out and "Rome" in out
    assert "User defined parameters:" in out and "Cleared session context" in out


def test_create_show_copy_remove(run_cli, tmp_path: Path) -> None:  # noqa: ANN001
    system = "You are a terse geography assistant."
    (tmp_path / "Modelfile").write_text(f"FROM smollm2\nPARAMETER temperature 0\nSYSTEM {system}\n")
    ok(run_cli("create", "geo", "-f", str(tmp_path / "Modelfile")))
    modelfile = ok(run_cli("show", "geo", "--modelfile"))
    assert "PARAMETER temperature 0" in modelfile and system in modelfile
    assert ok(run_cli("show", "geo", "--system")).strip() == system
    assert "temperature" in ok(run_cli("show", "geo"))  # the summary's Parameters section
    assert ok(run_cli("cp", "geo", "geo2")).strip() == "copied 'geo' to 'geo2'"
    assert "geo2:latest" in ok(run_cli("list"))
    ok(run_cli("rm", "geo", "geo2"))
    names = [line.split()[0] for line in ok(run_cli("list")).splitlines()[1:]]
    assert "geo:latest" not in names and "geo2:latest" not in names


def test_create_resolves_a_relative_from_against_the_modelfile(
    run_cli,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    gguf = ModelStore(tmp_path).get("smollm2").path
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "local.gguf").symlink_to(gguf)
    (tmp_path / "Modelfile").write_text("FROM ./models/local.gguf\n")
    ok(run_cli("create", "local", "-f", "Modelfile", cwd=tmp_path))
    ok(run_cli("rm", "local"))


def test_stop_unloads(run_cli, server: LiveServer) -> None:  # noqa: ANN001
    load(server, "smollm2")
    ok(run_cli("stop", "smollm2"))
    assert "smollm2:latest" not in running(server)
    again = run_cli("stop", "smollm2")  # not loaded: an error, and it is not loaded by it
    assert again.returncode == 1 and "couldn't find model" in again.stderr
    assert "smollm2:latest" not in running(server)


# -- pieces ----------------------------------------------------------------------------
def test_resolve_from_leaves_names_and_block_text_alone(tmp_path: Path) -> None:
    text = 'FROM ./m.gguf\nSYSTEM """\nFROM here on, be brief.\n"""\n'
    assert resolve_from(text, tmp_path).splitlines()[:3] == [
        f"FROM {tmp_path.resolve() / 'm.gguf'}",
        'SYSTEM """',
        "FROM here on, be brief.",
    ]
    assert resolve_from("from smollm2\n", tmp_path) == "FROM smollm2\n"


def test_multiline_input_and_script_rule() -> None:
    lines = ['"""one', "two", 'three"""', '/set system """a', 'b"""', "plain"]
    assert list(_take(inputs(script_reader(lines)), 3)) == [
        "one\ntwo\nthree",
        "/set system a\nb",
        "plain",
    ]
    assert is_script("\n  /set parameter temperature 0\nhi\n")
    assert not is_script("What is /etc/hosts?\n")


def test_ollama_style_units() -> None:
    assert [human_bytes(n) for n in (999, 1500, 105_000_000, 1_900_000_000)] == [
        "999 B",
        "1.5 KB",
        "105 MB",
        "1.9 GB",
    ]
    assert go_duration(1_500_000_000) == "1.5s"
    assert go_duration(12_345_000) == "12.345ms"
    assert go_duration(61_000_000_000) == "1m1s"


def _take(it: Iterator[str], n: int) -> Iterator[str]:
    for _ in range(n):
        yield next(it)
