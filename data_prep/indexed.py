"""Megatron-Core's indexed dataset format (`P.bin` tokens, `P.idx` index), streamed.

The files are byte-for-byte what `megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`
writes with one sequence per document (`add_item` + `end_document`), but the index is built
on disk instead of in Python lists, so memory stays flat however many documents there are.

`.idx` layout, little endian:
    b"MMIDIDX\\x00\\x00", version u64 = 1, token dtype code u8,
    sequence count n u64, document count n + 1 u64,
    sequence lengths int32[n], sequence byte offsets into .bin int64[n],
    document indices int64[n + 1] = 0, 1, ..., n
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from .errors import DataPrepError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# Megatron-Core's DType enum codes.
DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
_COUNTS_OFFSET = len(INDEX_MAGIC) + 8 + 1
_HEADER_BYTES = _COUNTS_OFFSET + 16
_BLOCK = 1 << 20  # index entries handled at once when finishing


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest integer dtype Megatron can read that holds every token id."""
    for dtype in (np.uint8, np.uint16, np.int32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary of {vocab_size} does not fit in int32")


class IndexedDatasetWriter:
    """Appends documents (flat tokens + per-document lengths) to `prefix.bin` / `prefix.idx`.

    The lengths go straight into the .idx file; `finish()` appends the byte offsets and
    document indices computed from them and fills in the counts of the header.
    """

    def __init__(self, prefix: str, dtype: np.dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.documents = 0
        self.tokens = 0
        self._bin = open(prefix + ".bin", "wb")
        self._idx = open(prefix + ".idx", "wb")
        self._idx.write(INDEX_MAGIC + struct.pack("<QB", INDEX_VERSION, DTYPE_CODES[self.dtype]))
        self._idx.write(struct.pack("<QQ", 0, 0))  # counts, filled in by finish()

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self._bin.write(tokens.astype(self.dtype, copy=False).data)
        self._idx.write(lengths.astype(np.int32, copy=False).data)
        self.documents += len(lengths)
        self.tokens += len(tokens)

    def finish(self) -> None:
        self._bin.close()
        self._idx.flush()
        count = self.documents
        with open(self.prefix + ".idx", "rb") as lengths_file:
            lengths_file.seek(_HEADER_BYTES)
            offset = 0
            for start in range(0, count, _BLOCK):
                sizes = np.fromfile(lengths_file, np.int32, min(_BLOCK, count - start)).astype(np.int64)
                sizes *= self.dtype.itemsize
                ends = np.cumsum(sizes) + offset
                self._idx.write((ends - sizes).data)
                offset = int(ends[-1])
        for start in range(0, count + 1, _BLOCK):
            self._idx.write(np.arange(start, min(start + _BLOCK, count + 1), dtype=np.int64).data)
        self._idx.seek(_COUNTS_OFFSET)
        self._idx.write(struct.pack("<QQ", count, count + 1))
        self._idx.close()

    def close(self) -> None:
        """Release the files without finishing (the run failed; the caller discards them)."""
        self._bin.close()
        self._idx.close()


@dataclass
class IndexedDatasetView:
    """Read-only, memory-mapped view of an indexed dataset (for `inspect`, without torch)."""

    prefix: str
    dtype: np.dtype
    lengths: np.ndarray
    pointers: np.ndarray
    tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def document(self, index: int) -> np.ndarray:
        start = int(self.pointers[index]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.lengths[index])]

    @property
    def ends(self) -> np.ndarray:
        """Position in `tokens` of each document's last token."""
        return self.pointers // self.dtype.itemsize + self.lengths - 1


def verify_dataset(prefix: str) -> None:
    """Refuse a dataset that training would crash on or misread, before training starts.

    Cheap for any size: reads the index's header and last entry, and only the size of the
    .bin, which must be exactly where the last document ends (a truncated copy is not).
    """
    _verified_header(prefix)


def open_indexed_dataset(prefix: str) -> IndexedDatasetView:
    """Memory-map a dataset that passes `verify_dataset`."""
    dtype, count = _verified_header(prefix)
    lengths = _map(prefix + ".idx", np.int32, _HEADER_BYTES, count)
    pointers = _map(prefix + ".idx", np.int64, _HEADER_BYTES + 4 * count, count)
    tokens = _map(prefix + ".bin", dtype, 0, os.path.getsize(prefix + ".bin") // dtype.itemsize)
    return IndexedDatasetView(prefix, dtype, lengths, pointers, tokens)


def _verified_header(prefix: str) -> tuple[np.dtype, int]:
    """(token dtype, document count) of a dataset whose files agree with each other."""
    index_path, bin_path = prefix + ".idx", prefix + ".bin"
    rebuild = "rebuild it: rerun the `python -m data_prep tokenize` command that wrote it, with --force"
    try:
        with open(index_path, "rb") as index:
            header = index.read(_HEADER_BYTES)
            index_bytes = os.fstat(index.fileno()).st_size
            if len(header) < _HEADER_BYTES or not header.startswith(INDEX_MAGIC):
                raise DataPrepError(f"{index_path} is not a Megatron indexed dataset index; {rebuild}")
            version, code, count, document_count = struct.unpack("<QBQQ", header[len(INDEX_MAGIC) :])
            dtype = {code: dtype for dtype, code in DTYPE_CODES.items()}.get(code)
            if version != INDEX_VERSION or dtype is None:
                raise DataPrepError(
                    f"{index_path} has index version {version} and dtype code {code}, not version "
                    f"{INDEX_VERSION} and a code of {sorted(DTYPE_CODES.values())}; {rebuild}"
                )
            if count == 0:
                raise DataPrepError(f"{index_path} holds no documents: there is nothing to train on; {rebuild}")
            expected_index_bytes = _HEADER_BYTES + 12 * count + 8 * document_count
            if index_bytes != expected_index_bytes:
                raise DataPrepError(
                    f"{index_path} is {index_bytes:,} bytes, but its header describes {count:,} documents "
                    f"in {expected_index_bytes:,} bytes (truncated or damaged); {rebuild}"
                )
            index.seek(_HEADER_BYTES + 4 * (count - 1))
            (last_length,) = struct.unpack("<i", index.read(4))
            index.seek(_HEADER_BYTES + 4 * count + 8 * (count - 1))
            (last_pointer,) = struct.unpack("<q", index.read(8))
        bin_bytes = os.stat(bin_path).st_size
    except OSError as exc:
        raise DataPrepError(f"cannot read the dataset {prefix!r}: {exc}; {rebuild}") from exc
    if bin_bytes == 0:
        raise DataPrepError(f"{bin_path} is empty: there are no tokens to train on; {rebuild}")
    expected_bin_bytes = last_pointer + last_length * dtype.itemsize
    if bin_bytes != expected_bin_bytes:
        raise DataPrepError(
            f"{bin_path} is {bin_bytes:,} bytes, but {index_path} says its {count:,} documents "
            f"of {dtype.name} tokens end at byte {expected_bin_bytes:,} (truncated or damaged); {rebuild}"
        )
    return dtype, count


def _map(path: str, dtype: np.dtype, offset: int, count: int) -> np.ndarray:
    return np.memmap(path, dtype, "r", offset, (count,))
