"""OpenAI's files, as the Batch API uses them: uploaded inputs and the outputs it writes.

Each file is `<root>/<id>` with its object beside it in `<id>.json` (id, bytes,
created_at, filename, purpose). Uploads stream to a temporary name and become the file
only when whole, so a crash never leaves half a file under an id.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from accordion.errors import InvalidRequestError

MAX_BYTES = 512 << 20  # an input of ~10^6 short chat lines
PURPOSES = ("batch", "batch_output")


class NoSuchFile(KeyError):
    """A file id that is not (or no longer) stored."""


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, chunks: Any, filename: str, purpose: str) -> dict[str, Any]:
        """Store an upload (an iterable of byte chunks) and return its file object."""
        if purpose not in PURPOSES:
            raise InvalidRequestError(f"purpose must be one of {', '.join(PURPOSES)}")
        self.root.mkdir(parents=True, exist_ok=True)
        size = 0
        with tempfile.NamedTemporaryFile(dir=self.root, delete=False, suffix=".part") as tmp:
            try:
                for chunk in chunks:
                    size += len(chunk)
                    if size > MAX_BYTES:
                        raise InvalidRequestError(f"file is over {MAX_BYTES} bytes")
                    tmp.write(chunk)
            except BaseException:
                os.unlink(tmp.name)
                raise
        return self.adopt(Path(tmp.name), filename, purpose)

    def adopt(self, path: Path, filename: str, purpose: str) -> dict[str, Any]:
        """Make an existing file (moved in) a stored one; its object is returned."""
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        doc = {
            "id": file_id,
            "object": "file",
            "bytes": path.stat().st_size,
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        os.replace(path, self.root / file_id)
        (self.root / f"{file_id}.json").write_text(json.dumps(doc))
        return doc

    def get(self, file_id: str) -> dict[str, Any]:
        meta = self._meta(file_id)
        if not meta.is_file():
            raise NoSuchFile(file_id)
        return json.loads(meta.read_text())

    def path(self, file_id: str) -> Path:
        self.get(file_id)
        return self.root / file_id

    def list(self, purpose: str | None = None) -> list[dict[str, Any]]:
        docs = [json.loads(p.read_text()) for p in self.root.glob("file-*.json")]
        docs = [d for d in docs if purpose is None or d["purpose"] == purpose]
        return sorted(docs, key=lambda d: (d["created_at"], d["id"]), reverse=True)

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        (self.root / file_id).unlink(missing_ok=True)
        self._meta(file_id).unlink(missing_ok=True)

    def _meta(self, file_id: str) -> Path:
        if not file_id.startswith("file-") or not file_id[5:].isalnum():
            raise NoSuchFile(file_id)
        return self.root / f"{file_id}.json"
