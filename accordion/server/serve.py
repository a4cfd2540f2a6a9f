"""`accordion serve`: HTTP on a background thread; the engines in their own process
(process/), or with --no-engine-process on this process's main thread."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import uvicorn

from accordion import heap
from accordion.api.app import create_app
from accordion.api.security import Policy
from accordion.batch.service import Batches
from accordion.loader.bundled import join_all
from accordion.server.address import base_url, host_port
from accordion.server.http_protocol import DeadlineH11Protocol
from accordion.server.manager import ModelManager
from accordion.server.store import ModelStore, allowed_paths, default_root


def serve(
    address: str | None = None, log_level: str = "info", engine_process: bool | None = None
) -> None:
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s level=%(levelname)s %(name)s %(message)s"
    )
    host, port, _ = host_port(address)
    root = default_root()
    store = ModelStore(root, allowed_paths(root))
    if engine_process is None:  # the engines in their own process unless told otherwise
        engine_process = os.environ.get("ACCORDION_ENGINE_PROCESS", "1") not in ("", "0")
    manager = ModelManager(store, engine_process=engine_process)
    app = create_app(manager, store, Policy.from_env(host))
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            access_log=False,
            http=DeadlineH11Protocol,
        )
    )
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]

    def shutdown(*_: object) -> None:
        server.should_exit = True
        manager.stop()

    signal.signal(signal.SIGINT, shutdown)
    signal.signal(signal.SIGTERM, shutdown)
    # a chunked bundled model is joined (and checked) once, before anyone waits for it
    threading.Thread(target=join_all, name="accordion-join", daemon=True).start()
    heap.freeze()  # torch, FastAPI and friends: see heap.freeze
    http = threading.Thread(target=server.run, name="accordion-http", daemon=True)
    http.start()
    while not server.started and http.is_alive():  # e.g. the port is taken: uvicorn gives up
        time.sleep(0.05)
    if not server.started:
        raise SystemExit(f"accordion: could not listen on {host}:{port}")
    url = base_url(f"{host}:{port}")
    logging.getLogger("accordion.server").info("dashboard at %s/dashboard/", url)
    # batches talk to this server over loopback, as `accordion batch --endpoint` does
    app.state.batches = Batches(root / "batches", app.state.files, url)
    app.state.batches.resume_all()
    try:
        manager.drive()  # torch work stays on the main thread (see engine/engine.py)
    finally:
        server.should_exit = True
        http.join(timeout=10)
