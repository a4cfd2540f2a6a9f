"""The model store: bundled models by name, created models as small manifests.

A created model is a manifest (`<root>/manifests/<name>/<tag>.json`) naming its
GGUF file plus Modelfile-style settings (parameters, system, template); the
GGUF itself is never copied. Names are validated so nothing escapes the root.
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

from accordion.errors import InvalidRequestError, ModelNotFoundError
from accordion.loader.bundled import BUNDLED, bundled_path, split_tag

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

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    @property
    def digest(self) -> str:
        """Stable id of the file and settings (not a content hash of the weights)."""
        st = self.path.stat()
        raw = json.dumps(
            [
                str(self.path),
                st.st_size,
                st.st_mtime_ns,
                self.parameters,
                self.system,
                self.template,
            ],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(raw.encode()).hexdigest()


class ModelStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_root()

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
                path = bundled_path(name)
                assert path is not None
                return ModelEntry(
                    canonical(name), path, source=base, bundled=True, modified_at=_mtime(path)
                )
        candidate = Path(str(name)).expanduser()
        if str(name).endswith(".gguf") and candidate.is_file():
            return ModelEntry(
                str(candidate),
                candidate.resolve(),
                source=str(candidate),
                modified_at=_mtime(candidate),
            )
        raise ModelNotFoundError(f"model '{name}' not found")

    def _read(self, name: str, manifest: Path) -> ModelEntry:
        doc = json.loads(manifest.read_text())
        return ModelEntry(
            name,
            Path(doc["gguf"]),
            doc.get("parameters", {}),
            doc.get("system"),
            doc.get("template"),
            doc.get("from", ""),
            False,
            _mtime(manifest),
        )

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
    return datetime.fromtimestamp(path.stat().st_mtime, UTC)
