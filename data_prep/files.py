"""Files written whole or not at all, and files hashed without reading them into memory.

Used by data_prep and by the training side (`launch`), which may import data_prep.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

HASH_BLOCK_BYTES = 1 << 22  # large blocks: hashlib releases the GIL while it hashes one


@contextlib.contextmanager
def replaced_atomically(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write; once the block ends the file is synced
    to disk and renamed to `path`, so a reader (or a rerun after a kill) sees the old file or
    the new one, never half of one. If the block raises, the temporary file is removed.

    The temporary name is hidden, unique (two writers never share one) and keeps the suffix
    of `path`, for writers that choose a format by it (matplotlib's savefig)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        descriptor = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text_atomically(path: str | Path, text: str) -> None:
    """`path` holds `text`, written through `replaced_atomically`."""
    with replaced_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks (checkpoint shards can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()
