"""The model store: bundled models by name, created models as small manifests.

A created model is a manifest (`<root>/manifests/<name>/<tag>.json`) naming its
GGUF file plus Modelfile-style settings (parameters, system, template); the
GGUF itself is never copied. Names are validated so nothing escapes the root.

A server's store loads GGUF files by path only inside the allowed folders: the
store, the bundled models and ACCORDION_ALLOW_PATHS (os.pathsep-separated, `*`
for anywhere). A file becomes a model only once it reads as a GGUF of an
architecture we run; a manifest whose file broke later is listed as broken.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from accordion.errors import ForbiddenError, InvalidRequestError, ModelNotFoundError
from accordion.loader.bundled import BUNDLED, bundled_folders, bundled_path, split_tag
from accordion.loader.gguf_file import cache_root, open_gguf

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}"
NAME = re.compile(rf"^(?:{_SEGMENT}/)?{_SEGMENT}(?::[A-Za-z0-9][A-Za-z0-9._-]{{0,79}})?$")


def default_root() -> Path:
    return Path(os.environ.get("ACCORDION_MODELS", Path.home() / ".accordion" / "models"))


def canonical(name: str) -> str:
    """'smollm2' -> 'smollm2:latest'; raises InvalidRequestError for unsafe names."""
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidRequestError(f"invalid model name {name!r}")
    base, tag = split_tag(name)
    return f"{base}:{tag}"


@dataclass
class ModelEntry:
    name: str  # canonical name:tag (or the path for a bare GGUF path)
    path: Path  # the GGUF file
    parameters: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    template: str | None = None
    source: str = ""  # what it was created FROM
    bundled: bool = False
    modified_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    problem: str | None = None  # why this entry cannot load (a broken manifest or file)

    @property
    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    @property
    def digest(self) -> str:
        """Stable id of the file and settings (not a content hash of the weights)."""
        try:
            st = self.path.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = 0, 0
        raw = json.dumps(
            [
                str(self.path),
                size,
                mtime,
                self.parameters,
                self.system,
                self.template,
            ],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(raw.encode()).hexdigest()


def allowed_paths(root: Path) -> list[Path]:
    """The folders a server may load GGUF files from by path."""
    extra = [Path(p) for p in os.environ.get("ACCORDION_ALLOW_PATHS", "").split(os.pathsep) if p]
    return [root, cache_root() / "models", *bundled_folders(), *extra]


class ModelStore:
    def __init__(self, root: Path | None = None, allow_paths: list[Path] | None = None) -> None:
        """`allow_paths` None: any path loads (in-process use); a server passes the list."""
        self.root = root or default_root()
        self.allow_paths = allow_paths

    def _manifest(self, name: str) -> Path:
        base, tag = split_tag(canonical(name))
        return self.root / "manifests" / base / f"{tag}.json"

    def get(self, name: str) -> ModelEntry:
        """Created manifest, then bundled model, then a GGUF path; else ModelNotFoundError."""
        if isinstance(name, str) and NAME.match(name):
            manifest = self._manifest(name)
            if manifest.is_file():
                return self._read(canonical(name), manifest)
            base, tag = split_tag(name)
            if base in BUNDLED and tag == "latest":
                path = bundled_path(name, join=False)  # joined off the request path
                assert path is not None
                return ModelEntry(
                    canonical(name), path, source=base, bundled=True, modified_at=_mtime(path)
                )
        if isinstance(name, str) and name.endswith(".gguf"):
            candidate = self._allowed_file(name)
            if candidate is not None:
                return ModelEntry(name, candidate, source=name, modified_at=_mtime(candidate))
        raise ModelNotFoundError(f"model '{name}' not found")

    def _allowed_file(self, name: str) -> Path | None:
        """The resolved file a path names, if it may be loaded; ForbiddenError if not."""
        try:
            given = Path(name).expanduser() if self.allow_paths is None else Path(name)
            path = given.resolve()
            if not path.is_file():
                return None
        except (OSError, ValueError, RuntimeError):  # NUL bytes, unknown ~user, loops
            return None
        folders = self.allow_paths
        if folders is None or any(str(f) == "*" for f in folders):
            return path
        if not any(path.is_relative_to(f.resolve()) for f in folders):
            raise ForbiddenError(
                f"model '{name}': loading files by path is allowed only inside the model"
                " store and ACCORDION_ALLOW_PATHS"
            )
        return path

    def _read(self, name: str, manifest: Path) -> ModelEntry:
        try:
            doc = json.loads(manifest.read_text())
            path = Path(doc["gguf"])
        except (OSError, ValueError, KeyError, TypeError):
            return ModelEntry(name, manifest, problem="its manifest is unreadable")
        entry = ModelEntry(
            name,
            path,
            doc.get("parameters", {}),
            doc.get("system"),
            doc.get("template"),
            doc.get("from", ""),
            False,
            _mtime(manifest),
        )
        if not path.is_file():
            entry.problem = "its model file is missing"
        return entry

    def ensure_file(self, entry: ModelEntry) -> None:
        """Make the entry's file ready: join a chunked bundled model (slow: run it off the
        HTTP thread); raise if the entry is broken."""
        if entry.problem:
            raise ModelNotFoundError(f"model '{entry.name}' is broken: {entry.problem}")
        if entry.bundled:
            bundled_path(entry.name)

    def check_file(self, entry: ModelEntry) -> None:
        """A file becomes a model only if it reads as a GGUF we can run (slow: off thread)."""
        from accordion.models.config import config_from_gguf

        self.ensure_file(entry)
        if not entry.bundled:
            config_from_gguf(open_gguf(entry.path))

    def list(self) -> list[ModelEntry]:
        entries = []
        for base in BUNDLED:
            try:
                entries.append(self.get(base))
            except ModelNotFoundError:
                continue  # its package is not installed
        for manifest in sorted((self.root / "manifests").glob("*/*.json")):
            entries.append(self._read(f"{manifest.parent.name}:{manifest.stem}", manifest))
        for manifest in sorted((self.root / "manifests").glob("*/*/*.json")):
            name = f"{manifest.parent.parent.name}/{manifest.parent.name}:{manifest.stem}"
            entries.append(self._read(name, manifest))
        return entries

    def create(
        self,
        name: str,
        source: str,
        parameters: dict[str, Any] | None = None,
        system: str | None = None,
        template: str | None = None,
    ) -> ModelEntry:
        """A new name FROM an existing model or a GGUF path, with its own settings."""
        name = canonical(name)
        base = self.get(source)  # raises ModelNotFoundError for an unknown source
        self.check_file(base)  # random bytes, a truncated file, /etc/passwd: a 400 now
        doc = {
            "from": source,
            "gguf": str(base.path),
            "parameters": {**base.parameters, **(parameters or {})},
            "system": system if system is not None else base.system,
            "template": template if template is not None else base.template,
            "created_at": datetime.now(UTC).isoformat(),
        }
        self._write(name, doc)
        return self.get(name)

    def _write(self, name: str, doc: dict[str, Any]) -> None:
        path = self._manifest(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(path)

    def copy(self, source: str, destination: str) -> None:
        entry = self.get(source)
        self._write(
            canonical(destination),
            {
                "from": entry.source or entry.name,
                "gguf": str(entry.path),
                "parameters": entry.parameters,
                "system": entry.system,
                "template": entry.template,
                "created_at": datetime.now(UTC).isoformat(),
            },
        )

    def delete(self, name: str) -> None:
        manifest = self._manifest(name)
        if not manifest.is_file():
            if split_tag(name)[0] in BUNDLED:
                raise InvalidRequestError(f"model '{name}' is bundled and cannot be deleted")
            raise ModelNotFoundError(f"model '{name}' not found")
        manifest.unlink()


def _mtime(path: Path) -> datetime:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except OSError:  # a chunked bundled model not joined yet, a file gone missing
        return datetime.now(UTC)
