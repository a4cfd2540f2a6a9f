"""Open a GGUF file: small metadata, tensor directory, raw tensor bytes.

`gguf.GGUFReader` builds numpy views for every vocabulary string, which takes
seconds on a 262k-token vocabulary. We run it once per file and keep what we
need (metadata without the big tokenizer arrays, the tensor directory) in a
per-file cache directory; later opens read one small JSON file and memory-map
the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from accordion.errors import InvalidModelFileError

GGUF_MAGIC = b"GGUF"
CACHE_VERSION = 1
# Read lazily: only the tokenizer builder needs them, and it caches its result.
BIG_ARRAYS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
)


def cache_root() -> Path:
    return Path(os.environ.get("ACCORDION_CACHE", Path.home() / ".cache" / "accordion"))


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: outermost first (ggml's ne reversed)
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    cache_dir: Path
    _reader: Any = field(default=None, repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch_get(self, key: str, default: Any = None) -> Any:
        """`{architecture}.{key}`, the way GGUF names hyper-parameters."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def array(self, key: str) -> list[str] | np.ndarray | None:
        """One of BIG_ARRAYS: strings as list[str], numbers as numpy; slow path."""
        reader = self._open_reader()
        f = reader.fields.get(key)
        if f is None:
            return None
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
        return np.concatenate([f.parts[i] for i in f.data]) if f.data else np.zeros(0)

    @cached_property
    def _mmap(self) -> np.memmap:
        # copy-on-write: torch takes views of it as writable arrays; nothing writes them
        return np.memmap(self.path, dtype=np.uint8, mode="c")

    def tensor_bytes(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return self._mmap[t.offset : t.offset + t.nbytes]

    def _open_reader(self) -> Any:
        if self._reader is None:
            self._reader = _read(self.path)
        return self._reader


def _cache_key(path: Path) -> str:
    st = path.stat()
    raw = f"{CACHE_VERSION}|{path}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def _read(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(path, "r")
    except Exception as e:  # the reader raises many kinds on a bad file
        raise InvalidModelFileError(
            path, f"not a readable GGUF file ({type(e).__name__})"
        ) from None


def _plain(value: Any) -> Any:
    """numpy scalars and arrays -> JSON-safe Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _scan(path: Path, cache_dir: Path) -> tuple[dict[str, Any], dict[str, TensorInfo], Any]:
    reader = _read(path)
    metadata: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key in BIG_ARRAYS or key.startswith("GGUF."):
            continue
        try:
            metadata[key] = _plain(f.contents())
        except Exception:
            continue  # an exotic field we do not use must not stop the load
    size = path.stat().st_size
    tensors: dict[str, TensorInfo] = {}
    for t in reader.tensors:
        offset = int(t.data_offset)
        nbytes = int(t.n_bytes)
        if offset + nbytes > size:
            raise InvalidModelFileError(
                path,
                f"truncated GGUF, tensor {t.name!r} ends at byte {offset + nbytes}"
                f" but the file has {size}",
            )
        shape = tuple(int(d) for d in reversed(list(t.shape)))
        tensors[t.name] = TensorInfo(t.name, shape, int(t.tensor_type), offset, nbytes)
    cache_dir.mkdir(parents=True, exist_ok=True)
    doc = {"metadata": metadata, "tensors": [list(t.__dict__.values()) for t in tensors.values()]}
    tmp = cache_dir / "gguf.json.tmp"
    tmp.write_text(json.dumps(doc))
    tmp.replace(cache_dir / "gguf.json")
    return metadata, tensors, reader


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open (and on first sight, index) a GGUF file; InvalidModelFileError if it is none."""
    path = Path(path).resolve()
    if not path.is_file():
        raise InvalidModelFileError(path, "no such file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise InvalidModelFileError(path, "not a GGUF file (its first bytes are not GGUF)")
    cache_dir = cache_root() / "gguf" / _cache_key(path)
    index = cache_dir / "gguf.json"
    reader = None
    try:
        doc = json.loads(index.read_text())
        metadata = doc["metadata"]
        tensors = {row[0]: TensorInfo(row[0], tuple(row[1]), *row[2:]) for row in doc["tensors"]}
    except (OSError, ValueError, KeyError, TypeError):
        metadata, tensors, reader = _scan(path, cache_dir)
    return GGUFFile(path, metadata, tensors, cache_dir, reader)
