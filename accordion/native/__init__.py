"""Native ops: C++ that calls ATen with no interpreter between kernels.

`block.cpp` holds a transformer block's work around attention as two ops (see
its header). It is compiled with the machine's g++ against the installed torch
the first time it is wanted (about 8 s), cached under the accordion cache
directory by a hash of the source, torch version and flags, and loaded with
`torch.ops.load_library`. `make setup` builds it ahead. Without a compiler, or
with ACCORDION_NATIVE=0, everything runs the equivalent Python.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from accordion.loader.gguf_file import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("block.cpp")
_state: dict[str, bool] = {}


def _flags() -> list[str]:
    root = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        "-O3",
        "-std=c++20",
        "-shared",
        "-fPIC",
        "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-I{root / 'include'}",
        f"-L{root / 'lib'}",
        f"-Wl,-rpath,{root / 'lib'}",
        "-ltorch",
        "-ltorch_cpu",
        "-lc10",
    ]


def library_path() -> Path:
    """Where the compiled library for this source, torch and flag set lives."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(" ".join(_flags()).encode())
    return cache_root() / "native" / f"block-{digest.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile block.cpp unless already built; raises RuntimeError on failure."""
    out = library_path()
    if out.exists():
        return out
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) found")
    out.parent.mkdir(parents=True, exist_ok=True)
    # a unique name, then an atomic rename: concurrent builders never see half a file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, str(SOURCE), "-o", tmp, *_flags()], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def available() -> bool:
    """Whether torch.ops.accordion is loaded (building it on first call)."""
    if "ok" not in _state:
        _state["ok"] = False
        if os.environ.get("ACCORDION_NATIVE", "1") != "0":
            try:
                torch.ops.load_library(str(build()))
                _state["ok"] = True
            except (RuntimeError, OSError) as e:
                log.warning("native ops unavailable, using the Python path: %s", e)
    return _state["ok"]
