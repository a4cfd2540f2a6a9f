"""Native ops: C++ that calls ATen with no interpreter between kernels.

`qmatmul.cpp` is the one matrix kernel, over the GGUF file's own blocks
(`blocks.h`, `activations.h`), with `qmatmul_amx.cpp` its AMX tiles;
`block.cpp` holds a transformer block's work around attention as two ops and
`attention.cpp` the paged attention of every query token, `stack.cpp` runs a
step's blocks through those in one call, and `rows.cpp` decodes whole rows for the
embedding and the head's leaders (see their headers).
They are compiled with the machine's g++ against the installed torch the first
time they are wanted (about 20 s, one compiler per file), cached under the
accordion cache directory by a hash of the sources,
torch version, flags and CPU, and loaded with `torch.ops.load_library`. `make
setup` builds them ahead. Without a compiler, or with ACCORDION_NATIVE=0,
everything runs the equivalent Python.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from accordion.loader.gguf_file import cache_root

log = logging.getLogger(__name__)

SOURCES = [
    Path(__file__).with_name(f"{name}.cpp")
    for name in ("block", "attention", "qmatmul", "qmatmul_amx", "rows", "sample", "stack")
]
HEADERS = sorted(Path(__file__).parent.glob("*.h"))
_state: dict[str, bool] = {}


def _compile_flags() -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        "-O3",
        "-march=native",  # the library is built on, and cached for, the machine using it
        "-fopenmp",  # at::parallel_for is OpenMP in torch's CPU build
        "-std=c++20",
        # no fused multiply-adds the source does not write: the same expression
        # compiles to the same arithmetic in every kernel that inlines it
        "-ffp-contract=off",
        "-fPIC",
        "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-I{Path(torch.__file__).parent / 'include'}",
    ]


def _link_flags() -> list[str]:
    lib = Path(torch.__file__).parent / "lib"
    libs = ["-ltorch", "-ltorch_cpu", "-lc10"]
    return ["-shared", "-fopenmp", f"-L{lib}", f"-Wl,-rpath,{lib}", *libs]


def library_path(
    sources: Sequence[Path] = tuple(SOURCES), flags: Sequence[str] = (), stem: str = "accordion"
) -> Path:
    """Where the library of `sources` (compiled with `flags` besides the usual) on
    this machine lives: <stem>-<machine>-<sources and flags>.so."""
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in [*sources, *HEADERS]))
    digest.update(" ".join(flags).encode())
    name = f"{stem}-{_machine_key()}-{digest.hexdigest()[:12]}.so"
    return cache_root() / "native" / name


def _machine_key() -> str:
    """What a build depends on besides the sources: torch, the flags, the CPU."""
    machine = hashlib.sha256()
    machine.update(torch.__version__.encode())
    machine.update(" ".join(_compile_flags() + _link_flags()).encode())
    machine.update(_cpu_flags().encode())
    return machine.hexdigest()[:12]


def cpu_has(flag: str) -> bool:
    """Whether the CPU reports a feature (as /proc/cpuinfo spells it, e.g. avx512f)."""
    return flag in _cpu_flags().split()


@functools.cache
def _cpu_flags() -> str:
    """The CPU's feature flags: -march=native code must not run on another CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def build(
    sources: Sequence[Path] = tuple(SOURCES), flags: Sequence[str] = (), stem: str = "accordion"
) -> Path:
    """Compile the sources unless already built; raises RuntimeError on failure.
    Tests build variants (other sources, flags and stem) beside the library."""
    out = library_path(sources, flags, stem)
    if out.exists():
        return out
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) found")
    out.parent.mkdir(parents=True, exist_ok=True)
    # unique names, then an atomic rename: concurrent builders never see half a file
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objects = [str(Path(tmp) / f"{source.stem}.o") for source in sources]
        jobs = [  # one compiler per source, side by side
            subprocess.Popen(
                [compiler, "-c", str(source), "-o", obj, *_compile_flags(), *flags],
                stderr=subprocess.PIPE,
                text=True,
            )
            for source, obj in zip(sources, objects, strict=True)
        ]
        # read each compiler's stderr to its end before its exit status: waiting first
        # hangs once an error report fills the pipe
        reports = [job.communicate()[1] for job in jobs]
        errors = [r for job, r in zip(jobs, reports, strict=True) if job.returncode != 0]
        library = str(Path(tmp) / "accordion.so")
        if not errors:
            done = subprocess.run(
                [compiler, *objects, "-o", library, *_link_flags()], capture_output=True, text=True
            )
            errors = [done.stderr] if done.returncode != 0 else []
        if errors:
            raise RuntimeError(f"compiling the native ops failed:\n{errors[0][-2000:]}")
        os.replace(library, out)
    for old in out.parent.glob(f"{stem}-{_machine_key()}-*.so"):  # older sources' builds
        if old != out:
            old.unlink(missing_ok=True)  # a process that mapped it keeps its copy
    return out


PRODUCTS = ("auto", "vector", "int8")
_products = ["auto"]  # the choice in force


def choose_products(kind: str) -> str:
    """Which code takes the quantized products, returning what takes them now:
    "auto" is AMX-BF16 tiles for every row count where the CPU has them, else the
    int16 vectors; "vector" the vectors everywhere; "int8" the vectors for a decode
    step's few rows and AMX-INT8 tiles for more, the same bits (qmatmul.cpp). Which
    an AMX CPU should take is a measurement (bench_foundation --modes auto,int8);
    ACCORDION_PRODUCTS sets it for a process."""
    if kind not in PRODUCTS:
        raise ValueError(f"products: one of {', '.join(PRODUCTS)}, not {kind!r}")
    _products[0] = kind
    ops = torch.ops.accordion
    bf16 = bool(ops.qmatmul_amx(kind == "auto"))
    int8 = bool(ops.qmatmul_int8_tiles(kind == "int8"))
    return "bf16 tiles" if bf16 else "int16 vectors + int8 tiles" if int8 else "int16 vectors"


def amx_tiles() -> bool:
    """Whether quantized products run on AMX-BF16 tiles (qmatmul_amx.cpp), every row
    count alike; otherwise on qmatmul.cpp's int16 vectors (and their int8 tiles)."""
    return available() and choose_products(_products[0]) == "bf16 tiles"


def available() -> bool:
    """Whether torch.ops.accordion is loaded (building it on first call)."""
    if "ok" not in _state:
        _state["ok"] = False
        if os.environ.get("ACCORDION_NATIVE", "1") != "0":
            try:
                torch.ops.load_library(str(build()))
                _state["ok"] = True
                choose_products(os.environ.get("ACCORDION_PRODUCTS", "auto"))
            except (RuntimeError, OSError) as e:
                log.warning("native ops unavailable, using the Python path: %s", e)
    return _state["ok"]
