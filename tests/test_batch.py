"""Batch jobs end to end on SmolLM2: the Python entry point and `accordion batch`.

Every id exactly once across kill -9 and resume, bad lines named by number, a
request that cannot fit as one error line, a tight memory budget that slows the
job instead of failing it, and the same outputs embedded and through a server.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from live_server import LiveServer

from accordion import batch

pytestmark = pytest.mark.slow
MODEL = "smollm2"
GREEDY = {"temperature": 0, "max_tokens": 6}
SYSTEM = "You answer in one short sentence. " * 3
TOPICS = ["rivers", "bread", "owls", "glass", "tides", "maps", "bees", "clocks", "salt", "moss"]


@pytest.fixture(autouse=True)
def jobs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "batches"
    monkeypatch.setenv("ACCORDION_BATCHES", str(root))
    monkeypatch.setenv("ACCORDION_MODELS", str(tmp_path / "models"))
    return root


def write_lines(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def questions(n: int, start: int = 0) -> list[dict]:
    return [
        {"custom_id": f"q{i}", "prompt": f"Say one thing about {TOPICS[i % 10]} ({i})."}
        for i in range(start, start + n)
    ]


def outputs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def answers(path: Path) -> dict[str, str]:
    """custom_id -> the answer's text; asserts each id appears once."""
    seen: dict[str, str] = {}
    for doc in outputs(path):
        assert doc["custom_id"] not in seen, f"{doc['custom_id']} twice"
        assert doc["response"]["status_code"] == 200, doc
        seen[doc["custom_id"]] = doc["response"]["body"]["choices"][0]["message"]["content"]
    return seen


def committed(job_dir: Path) -> int:
    db = job_dir / "job.db"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:  # the job has not made its tables yet
        return 0


def cli(*args: str, **popen: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "accordion", "batch", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ},
        **popen,  # type: ignore[arg-type]
    )


def run_args(
    tmp_path: Path, inp: Path, out: Path, job: Path, *extra: str, max_tokens: int = 6
) -> list[str]:
    """`batch run` of the tests' usual job: SmolLM2, the system prompt, greedy answers."""
    system = tmp_path / "system.txt"
    system.write_text(SYSTEM)
    return [
        "run",
        str(inp),
        "--out",
        str(out),
        "--model",
        MODEL,
        "--job-dir",
        str(job),
        "--system",
        str(system),
        "--temperature",
        "0",
        "--max-tokens",
        str(max_tokens),
        *extra,
    ]


def reference(tmp_path: Path, inp: Path, **options: object) -> dict[str, str]:
    out = tmp_path / "reference.jsonl"
    progress = batch.run(
        inp, out, model=MODEL, system=SYSTEM, sampling=GREEDY, job_dir=tmp_path / "ref", **options
    )
    assert progress.state == "finished"
    return answers(out)


# -- input ------------------------------------------------------------------------------
def test_bad_lines_are_named_and_nothing_runs_under_fail(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    good = questions(3)
    inp.write_text(
        json.dumps(good[0])
        + "\n{not json\n"
        + json.dumps(good[1])
        + "\n\n"
        + json.dumps({"custom_id": "q0", "prompt": "again"})
        + "\n"
        + json.dumps({"custom_id": "u", "url": "/v1/images", "body": {}})
        + "\n"
        + json.dumps(
            {"custom_id": "s", "messages": [{"role": "user", "content": "x"}], "stream": True}
        )
        + "\n"
        + json.dumps({"prompt": "no id"})
        + "\n"
        + json.dumps(good[2])
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    with pytest.raises(batch.RefusedError) as refused:
        batch.run(inp, out, model=MODEL, job_dir=tmp_path / "job")
    message = str(refused.value)
    assert "5 bad line(s)" in message and "nothing ran" in message
    assert "line 2: invalid JSON" in message
    assert "line 5: duplicate custom_id 'q0' (first on line 1)" in message
    assert "line 6: url must be one of" in message
    assert "line 7: stream is not supported" in message
    assert "line 8: custom_id must be a non-empty string" in message
    assert not out.exists()

    progress = batch.run(
        inp, out, model=MODEL, sampling=GREEDY, on_bad_line="skip", job_dir=tmp_path / "job2"
    )
    assert (progress.state, progress.done, progress.failed) == ("finished", 8, 5)
    assert set(answers(out)) == {"q0", "q1", "q2"}
    errors = outputs(tmp_path / "out.errors.jsonl")
    assert sorted(int(e["error"]["message"].split(":")[0][5:]) for e in errors) == [2, 5, 6, 7, 8]
    assert all(e["error"]["code"] == "invalid_line" and e["response"] is None for e in errors)


def test_a_request_that_cannot_fit_is_one_error_line(tmp_path: Path) -> None:
    docs = questions(4)
    docs.insert(2, {"custom_id": "long", "prompt": "tell me " * 200, "num_ctx": 128})
    inp = write_lines(tmp_path / "in.jsonl", docs)
    out = tmp_path / "out.jsonl"
    progress = batch.run(inp, out, model=MODEL, sampling=GREEDY, job_dir=tmp_path / "job")
    assert (progress.state, progress.done, progress.failed) == ("finished", 5, 1)
    assert set(answers(out)) == {"q0", "q1", "q2", "q3"}
    (error,) = outputs(tmp_path / "out.errors.jsonl")
    assert error["custom_id"] == "long" and error["response"]["status_code"] == 400
    assert "the context limit is 128" in error["error"]["message"]
    assert "prompt is 4" in error["error"]["message"]  # its token count


def test_a_changed_input_or_setting_refuses_to_resume(tmp_path: Path) -> None:
    inp = write_lines(tmp_path / "in.jsonl", questions(2))
    out = tmp_path / "out.jsonl"
    batch.run(inp, out, model=MODEL, sampling=GREEDY)  # the default job dir
    again = batch.run(inp, out, model=MODEL, sampling=GREEDY)  # the same job: nothing to do
    assert (again.state, again.finished_here) == ("finished", 0)
    with pytest.raises(batch.RefusedError, match=r"max_tokens 6 -> 7"):
        batch.run(inp, out, model=MODEL, sampling={**GREEDY, "max_tokens": 7})
    write_lines(inp, questions(3))
    with pytest.raises(batch.RefusedError, match="changed since"):
        batch.run(inp, out, model=MODEL, sampling=GREEDY)
    (listed,) = batch.jobs()
    assert (listed["state"], listed["done"], listed["total"]) == ("finished", 2, 2)


# -- the shared prefix -----------------------------------------------------------------------
def test_a_shared_system_prompt_is_computed_about_once(tmp_path: Path) -> None:
    n = 600
    # 1,104 tokens up to each request's own text, 69 whole 16-token cache blocks, so a
    # request computes only its own tokens (~9.5, measured) and not also the prefix's
    # last 4 (~13.5): nearly all of this test's time is those per-request tokens
    rules = " ".join(f"Rule {i}: be brief about {TOPICS[i % 10]}." for i in range(109))
    system = rules + " Be kind and keep it short."
    inp = write_lines(
        tmp_path / "in.jsonl", [{"custom_id": f"r{i}", "prompt": f"{i}?"} for i in range(n)]
    )
    out = tmp_path / "out.jsonl"
    progress = batch.run(
        inp, out, model=MODEL, system=system, sampling={"temperature": 0, "max_tokens": 1}
    )
    assert (progress.state, progress.done, progress.failed) == ("finished", n, 0)
    docs = outputs(out)
    assert len({d["custom_id"] for d in docs}) == n
    usage = [d["response"]["body"]["usage"] for d in docs]
    assert min(u["prompt_tokens"] for u in usage) > 1000  # the system prompt is ~1,000 tokens
    # a request computed the system prompt when fewer than 1,000 of its tokens came cached
    computed = sum(u["prompt_tokens_details"]["cached_tokens"] < 1000 for u in usage)
    assert computed <= progress.peak_inflight + 1, (computed, progress.peak_inflight)


# -- crashes -------------------------------------------------------------------------------
def test_kill_9_at_three_points_then_resume_gives_every_id_once(tmp_path: Path) -> None:
    n = 60
    inp = write_lines(tmp_path / "in.jsonl", questions(n))
    expected = reference(tmp_path, inp)
    out, job = tmp_path / "out.jsonl", tmp_path / "job"
    # a few in flight at a time, so that the kills land mid-job
    args = run_args(tmp_path, inp, out, job, "--max-inflight", "4")
    # well before the end: the last commit may land while a kill is on its way
    points = sorted(random.Random(0).sample(range(5, n - 20), 3))
    for point in points:
        proc = cli(*args)
        deadline = time.monotonic() + 120
        while committed(job) < point and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"the job ended before {point}: {proc.communicate()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with out.open("ab") as f:  # a write cut short by the crash
        f.write(b'{"id": "batch_req_torn", "custom_id": "q')
    status = batch.status(job)
    assert status["state"] == "interrupted" and 0 < status["done"] < n
    proc = cli("resume", str(job))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "finished: 60/60 done" in stderr
    assert answers(out) == expected  # every id once, each as an uninterrupted run gave it
    assert not (tmp_path / "out.errors.jsonl").read_text()


def test_ctrl_c_stops_cleanly_and_cancel_stops_a_running_job(tmp_path: Path) -> None:
    n = 60
    inp = write_lines(tmp_path / "in.jsonl", questions(n))
    out, job = tmp_path / "out.jsonl", tmp_path / "job"
    args = run_args(tmp_path, inp, out, job, "--max-inflight", "2")
    for stop in ("interrupt", "cancel"):
        # `batch cancel` is a second process that imports the package (seconds on a busy
        # machine) and the job heeds it within a second: cancel early, with most of the
        # job still to run, so the job cannot finish first
        target = committed(job) + (3 if stop == "interrupt" else 1)
        proc = cli(*args)
        while committed(job) < target and proc.poll() is None:
            time.sleep(0.02)
        if stop == "interrupt":
            proc.send_signal(signal.SIGINT)
        else:
            sub = subprocess.run(
                [sys.executable, "-m", "accordion", "batch", "cancel", str(job)],
                capture_output=True,
                text=True,
                check=True,
            )
            assert "cancelling" in sub.stdout
        _, stderr = proc.communicate(timeout=120)
        state = "interrupted" if stop == "interrupt" else "cancelled"
        assert f"{state}: " in stderr, stderr
        assert batch.status(job)["state"] == state
        assert len(outputs(out)) == committed(job)  # the file holds exactly what counts
    progress = batch.resume(job)
    assert progress.state == "finished" and len(answers(out)) == n


def test_status_list_and_cancel_answer_without_loading_the_engine(tmp_path: Path) -> None:
    # they read and write the job store: a user's `batch status` waits for no torch import
    code = (
        "import sys\n"
        "from accordion.cli.main import app\n"
        "for args in (['batch', 'list'], ['batch', 'status', sys.argv[1]],"
        " ['batch', 'cancel', sys.argv[1]]):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('engine loaded' if 'torch' in sys.modules else 'store only')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "no-job")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "no batch job at" in done.stderr  # status and cancel ran, and said why not
    assert done.stdout.splitlines()[-1] == "store only", done.stdout


# -- memory pressure -------------------------------------------------------------------------
def test_a_budget_for_two_sequences_slows_the_job_down_but_it_finishes(tmp_path: Path) -> None:
    # the first two (the plan's measurements) are short; the rest are long, so the plan
    # overcommits and the job must adapt while it runs
    docs = questions(2) + [
        {"custom_id": f"long{i}", "prompt": f"Write about {TOPICS[i % 10]}. " + "Go on. " * 20}
        for i in range(24)
    ]
    docs.append({"custom_id": "huge", "prompt": "word " * 400})
    inp = write_lines(tmp_path / "in.jsonl", docs)
    sampling = {"temperature": 0, "max_tokens": 64}
    free = batch.run(
        inp,
        tmp_path / "free.jsonl",
        model=MODEL,
        system=SYSTEM,
        sampling=sampling,
        job_dir=tmp_path / "free",
    )
    assert (free.state, free.failed) == ("finished", 0)
    assert free.kv_bytes_per_token
    # a long request holds ~70 tokens of its own and grows by 64: the budget admits three
    # prompts, which cannot all grow (blocks of 16 tokens)
    budget = 2 * 170 * free.kv_bytes_per_token
    tight = batch.run(
        inp,
        tmp_path / "tight.jsonl",
        model=MODEL,
        system=SYSTEM,
        sampling=sampling,
        job_dir=tmp_path / "tight",
        kv_budget=budget,
        max_inflight=16,
    )
    assert (tight.state, tight.done, tight.failed) == ("finished", len(docs), 1)
    expected = {k: v for k, v in answers(tmp_path / "free.jsonl").items() if k != "huge"}
    assert answers(tmp_path / "tight.jsonl") == expected
    assert tight.preemptions > 0 and tight.lowest_limit < tight.planned
    (error,) = outputs(tmp_path / "tight.errors.jsonl")
    assert error["custom_id"] == "huge" and "tokens of KV memory" in error["error"]["message"]


# -- through a server ----------------------------------------------------------------------
def test_an_endpoint_gives_the_embedded_outputs_and_survives_its_death(tmp_path: Path) -> None:
    n = 30
    inp = write_lines(tmp_path / "in.jsonl", questions(n))
    expected = reference(tmp_path, inp)
    (tmp_path / "models").mkdir(exist_ok=True)
    server = LiveServer(tmp_path / "models")
    try:
        for api in ("openai", "ollama"):
            out = tmp_path / f"{api}.jsonl"
            progress = batch.run(
                inp,
                out,
                model=MODEL,
                system=SYSTEM,
                sampling=GREEDY,
                job_dir=tmp_path / api,
                endpoint=server.url,
                api=api,
            )
            assert progress.state == "finished"
            assert answers(out) == expected, api
        out, job = tmp_path / "dies.jsonl", tmp_path / "dies"
        args = run_args(tmp_path, inp, out, job, "--endpoint", server.url)
        proc = cli(*args, "--retries", "2", "--max-inflight", "2")
        while committed(job) < 5 and proc.poll() is None:
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode != 0 and "after 2 retries" in stderr, stderr
        assert 5 <= committed(job) < n
    finally:
        server.stop()
    (tmp_path / "models").mkdir(exist_ok=True)
    server = LiveServer(tmp_path / "models")
    try:
        progress = batch.resume(job, endpoint=server.url)
    finally:
        server.stop()
    assert progress.state == "finished"
    assert answers(out) == expected


# -- conversation mode ------------------------------------------------------------------------
def test_conversation_mode_cuts_chunks_that_fit_and_resumes_inside_one(tmp_path: Path) -> None:
    limit, answer = 400, 40
    docs = [
        {
            "custom_id": f"c{i}",
            "prompt": f"Tell me fact {i} about {TOPICS[i % 10]}.",
            "num_ctx": limit,
        }
        for i in range(14)
    ]
    inp = write_lines(tmp_path / "in.jsonl", docs)
    sampling = {"temperature": 0, "max_tokens": answer}
    ref = tmp_path / "ref.jsonl"
    done = batch.run(
        inp,
        ref,
        model=MODEL,
        system=SYSTEM,
        sampling=sampling,
        mode="conversation",
        job_dir=tmp_path / "ref",
    )
    assert done.state == "finished" and done.chunks > 1 and "context limit 400" in done.plan
    usage = [d["response"]["body"]["usage"] for d in outputs(ref)]
    assert max(u["prompt_tokens"] for u in usage) + answer + 64 <= limit  # with the margin
    # each chunk starts again from the system prompt: the prompt shrinks exactly chunks - 1 times
    drops = sum(b["prompt_tokens"] < a["prompt_tokens"] for a, b in itertools.pairwise(usage))
    assert drops == done.chunks - 1
    # killed inside a chunk, resumed: the chunk is rebuilt from the store
    out, job = tmp_path / "out.jsonl", tmp_path / "job"
    proc = cli(*run_args(tmp_path, inp, out, job, "--mode", "conversation", max_tokens=answer))
    while committed(job) < 6 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    progress = batch.resume(job)
    assert progress.state == "finished" and progress.chunks == done.chunks
    assert answers(out) == answers(ref)


# -- probe ----------------------------------------------------------------------------------
# SmolLM2's context under 3 MiB is a few hundred tokens; Gemma 3's sliding-window layers
# hold only their window, so 32 MiB grows one sequence to several thousand (6,080, where
# full layers alone would give 1,820): enough for conversation chunks of our users' shape
# (2,400 system, 600 message, 300 answer tokens), 4 requests a chunk. (48 MiB gave 11,264,
# and the test's prompt of that size took most of its time.)
@pytest.mark.parametrize(("name", "budget"), [("smollm2", 3 * 2**20), ("gemma3", 32 * 2**20)])
def test_probe_measures_what_the_pool_holds(name: str, budget: int) -> None:
    from accordion.batch.plan import MARGIN, Shape
    from accordion.batch.probe import probe
    from accordion.engine.engine import Engine, EngineConfig
    from accordion.errors import RequestTooLargeError
    from accordion.loader.model import load_model
    from accordion.sampling_params import SamplingParams

    result = probe(name, budget, Shape(2400, 600, 300, 1000))
    per, block = result.bytes_per_token_config, result.block_size
    tokens = result.measured_tokens  # its blocks hold it within one block
    assert per * tokens <= result.bytes_per_token_measured * tokens <= per * (tokens + block)
    context = result.max_context
    assert 0 < context < result.trained_context
    assert result.prefill_tps > 0 and result.decode_tps_1 > 0 and result.decode_tps_batch > 0
    assert result.plan.chunk_requests == max(1, (context - MARGIN - 2400) // 900)
    if name == "gemma3":  # windows count as what they hold, not as full layers would
        assert context > budget // per and result.plan.chunk_requests > 1
    # the reported context holds: a prompt of that size runs under the budget; one more does not
    model = load_model(name)
    engine = Engine(model, EngineConfig(kv_budget_bytes=budget))
    greedy = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    out = engine.submit([100 + i % 500 for i in range(context)], greedy).result()
    assert out.finish_reason == "length" and out.error is None
    fresh = Engine(model, EngineConfig(kv_budget_bytes=budget))  # no cached prefix to share
    over = fresh.submit([100 + i % 500 for i in range(context + 1)], greedy).result()
    assert isinstance(over.error, RequestTooLargeError)


def test_probe_cli_prints_json() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accordion",
            "probe",
            MODEL,
            "--budget",
            "256MiB",
            "--requests",
            "500",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["budget_bytes"] == 256 * 2**20 and doc["shape"]["requests"] == 500
    plan = doc["plan"]
    assert plan["kv_tokens_shared"] == 2400 + 900 * plan["concurrency"]
    assert plan["kv_tokens_unshared"] == 3300 * plan["concurrency"]
    assert plan["concurrency"] > 0 and plan["kv_bytes_shared"] <= doc["budget_bytes"]
