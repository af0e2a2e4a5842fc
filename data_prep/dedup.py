"""`tokenize --dedup exact`: a document whose exact text came earlier in input order is dropped.

Each text has a 16-byte blake2b digest. Duplicates are dropped at three levels, each over units
whose own documents are already distinct, so that the order inside a unit never matters: a
worker drops the repeats within its chunk, a file's writer those of earlier chunks of the file,
and the assembly (of a run, a shard or the merge) those of earlier files. Each dataset keeps its
documents' digests in `X.hashes`, in its order, so that a shard's files, or a finished run's,
can be deduplicated again against the files that come before them.

Memory: the digests seen so far, 16 bytes a document (1.6 GB for 10^8 documents), kept as sorted
runs of at most RUN_LIMIT digests, plus while two runs merge about 40 bytes a digest of them
(at most 0.7 GB); at the assembly also 1 byte a document of the files that hold repeats (which
of their documents are kept). Disk: 16 bytes a document in `X.hashes`.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .errors import DataPrepError

DIGEST_BYTES = 16
HASHES_SUFFIX = ".hashes"
RUN_LIMIT = 1 << 24


def digests(texts: list[str]) -> np.ndarray:
    """Each text's digest as a row of two uint64 halves: shape (len(texts), 2)."""
    joined = b"".join(hashlib.blake2b(text.encode(), digest_size=DIGEST_BYTES).digest() for text in texts)
    return np.frombuffer(joined, np.uint64).reshape(-1, 2)


def first_occurrences(rows: np.ndarray) -> np.ndarray:
    """True for each row not equal to an earlier one."""
    keep = np.zeros(len(rows), bool)
    keep[np.unique(rows, axis=0, return_index=True)[1]] = True
    return keep


class SeenDigests:
    """Digests seen so far, as sorted runs: each run's high halves sorted, its low halves beside."""

    def __init__(self):
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []

    def seen(self, rows: np.ndarray) -> np.ndarray:
        """True for each row seen before (rows sorted first: numpy's binary search is faster so)."""
        order = np.argsort(rows[:, 0], kind="stable")
        high, low = rows[order, 0], rows[order, 1]
        found = np.zeros(len(rows), bool)
        for run_high, run_low in self._runs:
            position = np.searchsorted(run_high, high)
            at = np.minimum(position, len(run_high) - 1)
            same_high = run_high[at] == high
            found |= same_high & (run_low[at] == low)
            for i in np.flatnonzero(same_high & ~found):  # equal high halves, other low ones: almost never
                j = position[i]
                while j < len(run_high) and run_high[j] == high[i] and not found[i]:
                    found[i] = run_low[j] == low[i]
                    j += 1
        result = np.empty(len(rows), bool)
        result[order] = found
        return result

    def add(self, rows: np.ndarray) -> None:
        """Remember `rows`, merging runs of similar size (a stable sort of two sorted runs is linear)."""
        if not len(rows):
            return
        order = np.argsort(rows[:, 0], kind="stable")
        high, low = rows[order, 0], rows[order, 1]
        while self._runs and len(high) >= len(self._runs[-1][0]) and len(high) + len(self._runs[-1][0]) <= RUN_LIMIT:
            run_high, run_low = self._runs.pop()
            high, low = np.concatenate([run_high, high]), np.concatenate([run_low, low])
            order = np.argsort(high, kind="stable")
            high, low = high[order], low[order]
        self._runs.append((high, low))


def read_digests(prefix: str, first: int, count: int) -> np.ndarray:
    """Digests of documents first .. first + count - 1 of the dataset `prefix`."""
    with open(prefix + HASHES_SUFFIX, "rb") as file:
        file.seek(first * DIGEST_BYTES)
        data = file.read(count * DIGEST_BYTES)
    if len(data) != count * DIGEST_BYTES:
        raise DataPrepError(
            f"{prefix}{HASHES_SUFFIX} holds fewer than the {first + count:,} document digests its stats record; "
            "rebuild it: rerun the `python -m data_prep tokenize` command that wrote it, with --force"
        )
    return np.frombuffer(data, np.uint64).reshape(-1, 2)
