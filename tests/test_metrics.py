"""/metrics speaks Prometheus text and counts what the server did."""

from __future__ import annotations

from pathlib import Path

import httpx
from live_server import LiveServer

from accordion.loader.bundled import resolve_model_path


def test_metrics_count_requests_tokens_and_kv(server: LiveServer) -> None:
    body = {
        "model": "smollm2",
        "prompt": "Hi",
        "stream": False,
        "options": {"temperature": 0, "num_predict": 5},
    }
    rid = "metrics-test-1"
    r = httpx.post(
        server.url + "/api/generate", json=body, headers={"X-Request-ID": rid}, timeout=120
    )
    assert r.status_code == 200
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'accordion_requests_total{finish_reason="length",model="smollm2:latest"} 1.0' in text
    assert 'accordion_tokens_total{kind="generated",model="smollm2:latest"} 5.0' in text
    assert 'accordion_time_to_first_token_seconds_count{model="smollm2:latest"} 1.0' in text
    allocated = [
        line
        for line in text.splitlines()
        if line.startswith('accordion_kv_allocated_tokens{model="smollm2:latest"}')
    ]
    assert allocated and float(allocated[0].split()[-1]) > 0
    weights = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith('accordion_weights_bytes{model="smollm2:latest"}')
    ]
    size = resolve_model_path("smollm2").stat().st_size
    assert weights and 0.9 * size < weights[0] <= size  # the file's tensors, held once
    assert "accordion_queue_depth" in text and "accordion_preemptions_total" in text
    log = Path(server.log).read_text()
    assert f"request_id={rid} model=smollm2:latest" in log  # the request's log line carries its id
