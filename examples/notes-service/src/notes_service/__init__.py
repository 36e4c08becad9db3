"""A tiny service that keeps notes, one file each, on a cephvol volume.

The example of cephvol's README ("Use cephvol in your integration tests"): the
service knows nothing of Ceph; it writes to a directory. `open_volume` is the
one place it meets cephvol, through the Python API.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cephvol import api


class NotesStore:
    """Notes as JSON files under `root`, each written durably: a crash (or a
    detach) after `add` returns never loses the note."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def add(self, text: str) -> str:
        note_id = uuid.uuid4().hex[:12]
        tmp = self.root / f".{note_id}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"id": note_id, "text": text}, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(self.root / f"{note_id}.json")
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself must reach the disk too
        finally:
            os.close(dir_fd)
        return note_id

    def get(self, note_id: str) -> str:
        data: dict[str, Any] = json.loads((self.root / f"{note_id}.json").read_text("utf-8"))
        return str(data["text"])

    def ids(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.json"))


@contextmanager
def open_volume(image: str, mountpoint: Path, **cephvol_kw: Any) -> Iterator[NotesStore]:
    """Attach `image` at `mountpoint` (made and formatted on first use) and
    serve notes from it; detached when the block ends. `cephvol_kw` are
    cephvol.api's connection keywords (conf, state_dir, ...)."""
    with api.attach(image, mountpoint, **cephvol_kw) as vol:
        assert vol.mountpoint is not None
        yield NotesStore(vol.mountpoint / "notes")
