"""Input side: finding input files, decompressing them, cutting them into chunks of whole
lines, and turning each line into a document or a classified bad line.

Chunks are plain bytes with the number of their first line, so the parent process only
reads and slices, and workers do the decoding and JSON parsing in parallel.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import gzip
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import zstandard

from .errors import DataPrepError

FORMATS = (".jsonl", ".txt")
COMPRESSIONS = ("", ".gz", ".zst")
SUFFIXES = tuple(fmt + comp for fmt in FORMATS for comp in COMPRESSIONS)

# Bad-line kinds, in the order they are reported.
MALFORMED_JSON = "malformed_json"
INVALID_UTF8 = "invalid_utf8"
MISSING_KEY = "missing_key"
NOT_A_STRING = "not_a_string"
EMPTY_DOCUMENT = "empty_document"
BAD_LINE_KINDS = (MALFORMED_JSON, INVALID_UTF8, MISSING_KEY, NOT_A_STRING, EMPTY_DOCUMENT)
KIND_LABELS = {
    MALFORMED_JSON: "malformed JSON",
    INVALID_UTF8: "invalid UTF-8",
    MISSING_KEY: "missing key",
    NOT_A_STRING: "non-string value",
    EMPTY_DOCUMENT: "empty document",
}

CHUNK_BYTES = 1 << 19
_ZSTD_READ_BYTES = 1 << 14  # compressed bytes decompressed at once: text gives ~100 KB


@dataclass(frozen=True)
class BadLine:
    path: str
    line: int
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass(frozen=True)
class Chunk:
    """Whole lines of one file: `first_line` is the 1-based number of the first of them."""

    path: str
    first_line: int
    data: bytes


@dataclass
class ParsedChunk:
    texts: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    lines: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_bad: dict[str, BadLine] = field(default_factory=dict)


def is_plain_text(path: str) -> bool:
    return path.removesuffix(".gz").removesuffix(".zst").endswith(".txt")


def expand_inputs(specs: list[str]) -> list[str]:
    """Files, directories (searched recursively) and glob patterns -> sorted, de-duplicated files."""
    files: list[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(spec)
                for name in names
                if name.endswith(SUFFIXES)
            )
            if not found:
                raise DataPrepError(f"no input files under {spec!r} (looked for {', '.join(SUFFIXES)})")
        elif os.path.isfile(spec):
            if not spec.endswith(SUFFIXES):
                raise DataPrepError(f"unsupported input {spec!r}: the name must end in one of {', '.join(SUFFIXES)}")
            found = [spec]
        elif glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if p.endswith(SUFFIXES))
            if not found:
                raise DataPrepError(f"the pattern {spec!r} matches no input files ({', '.join(SUFFIXES)})")
        else:
            raise DataPrepError(f"input {spec!r} does not exist")
        files.extend(found)
    unique = {os.path.realpath(path): path for path in reversed(files)}
    return [path for path in files if unique.get(os.path.realpath(path)) == path]


@contextlib.contextmanager
def open_decompressed(path: str) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """Yield (decompressed stream, raw file); the raw file's position measures progress."""
    with open(path, "rb") as raw:
        if path.endswith(".zst"):
            yield _ZstdFrames(raw), raw
        elif path.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                yield stream, raw
        else:
            yield raw, raw


class _ZstdFrames:
    """Decompressed bytes of the zstd frames of a file, read in order.

    SlimPajama-style files may hold several frames and use long-distance windows. Unlike
    `ZstdDecompressor.stream_reader`, which ends silently where a truncated file ends, this
    raises EOFError (as gzip does) when the input ends inside a frame.
    """

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._decompressor = zstandard.ZstdDecompressor(max_window_size=2**31)
        self._frame = self._decompressor.decompressobj()
        self._in_frame = False  # input of the current frame was fed, its end not yet seen
        self._pending = bytearray()  # decompressed, not yet read

    def read(self, size: int) -> bytes:
        while len(self._pending) < size:
            compressed = self._raw.read(_ZSTD_READ_BYTES)
            if not compressed:
                if self._in_frame:
                    raise EOFError("the last zstd frame is incomplete")
                break
            self._feed(compressed)
        block = bytes(self._pending[:size])
        del self._pending[:size]
        return block

    def _feed(self, compressed: bytes) -> None:
        while compressed:
            self._pending += self._frame.decompress(compressed)
            self._in_frame = not self._frame.eof
            if self._in_frame:
                return
            compressed = self._frame.unused_data  # the start of the next frame
            self._frame = self._decompressor.decompressobj()


def read_chunks(path: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[Chunk, int]]:
    """Yield (chunk of whole lines of about `chunk_bytes`, bytes of the file read so far).

    Memory is bounded by the chunk size (or the longest line, if longer).
    """
    line = 1
    unfinished: list[bytes] = []  # blocks of a line whose end has not been read yet
    first = True
    with open_decompressed(path) as (stream, raw):
        while block := _read(stream, chunk_bytes, path, line):
            if first:  # a UTF-8 byte order mark (Windows editors write one) is not text of line 1
                block, first = block.removeprefix(codecs.BOM_UTF8), False
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                unfinished.append(block)
                continue
            chunk = Chunk(path, line, b"".join([*unfinished, block[:cut]]))
            unfinished = [block[cut:]]
            line += chunk.data.count(b"\n")
            yield chunk, raw.tell()
        if any(unfinished):  # a last line without a newline
            yield Chunk(path, line, b"".join(unfinished)), raw.tell()


def _read(stream: BinaryIO, size: int, path: str, line: int) -> bytes:
    """A truncated or corrupt file is an error in any --on-error mode: its end is missing,
    not a bad line."""
    try:
        return stream.read(size)
    except EOFError as exc:
        raise DataPrepError(
            f"{path}: compressed stream ends early (truncated file?); download it again or leave it out"
        ) from exc
    except (OSError, zstandard.ZstdError) as exc:
        raise DataPrepError(
            f"{path}: cannot read past line {line - 1} ({exc}); if the file is truncated or "
            "corrupt, download it again or leave it out"
        ) from exc


def parse_chunk(chunk: Chunk, json_key: str, domain_key: str | None, stop_at_first_bad: bool) -> ParsedChunk:
    """Documents of a chunk in order; bad lines are counted (first one of each kind kept)."""
    parsed = ParsedChunk()
    plain_text = is_plain_text(chunk.path)
    lines = chunk.data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the chunk's final newline ends a line, it does not start one
    parsed.lines = len(lines)
    for number, raw in enumerate(lines, start=chunk.first_line):
        try:
            text, domain = _parse_line(raw, plain_text, json_key, domain_key)
        except _Bad as bad:
            parsed.skipped[bad.kind] += 1
            parsed.first_bad.setdefault(bad.kind, BadLine(chunk.path, number, bad.kind, bad.reason))
            if stop_at_first_bad:
                break
            continue
        parsed.texts.append(text)
        parsed.domains.append(domain)
    return parsed


def describe_inputs(paths: list[str]) -> str:
    return ", ".join(paths) if len(paths) <= 3 else f"{len(paths):,} input files"


def describe_skipped(skipped: Counter) -> str:
    """ "skipped 3 lines: 2 malformed JSON, 1 empty document" """
    total = sum(skipped.values())
    parts = [f"{skipped[kind]:,} {KIND_LABELS[kind]}" for kind in BAD_LINE_KINDS if skipped[kind]]
    return f"skipped {total:,} line{'s' if total != 1 else ''}: {', '.join(parts)}"


class _Bad(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def _string_field(record: object, dotted_key: str) -> str:
    """`record["a"]["b"]` for "a.b", which must be a string."""
    value = record
    for part in dotted_key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise _Bad(MISSING_KEY, f"missing key {dotted_key!r}")
        value = value[part]
    if not isinstance(value, str):
        raise _Bad(NOT_A_STRING, f"key {dotted_key!r} is not a string ({type(value).__name__})")
    return value


def _parse_line(raw: bytes, plain_text: bool, json_key: str, domain_key: str | None) -> tuple[str, str]:
    """One input line -> (text, domain); raises _Bad(kind, reason) for a bad line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Bad(INVALID_UTF8, f"invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})") from None
    if plain_text:
        text, domain = line.removesuffix("\r"), ""
    else:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            reason = "blank line" if not line.strip() else f"{exc.msg} at column {exc.colno}"
            raise _Bad(MALFORMED_JSON, f"malformed JSON ({reason})") from None
        text = _string_field(record, json_key)
        domain = _string_field(record, domain_key) if domain_key else ""
        if domain_key and not domain:
            raise _Bad(MISSING_KEY, f"empty domain name in key {domain_key!r}")
        # JSON escapes can produce lone surrogates, which no UTF-8 tokenizer accepts.
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise _Bad(INVALID_UTF8, f"invalid UTF-8 (lone surrogate \\u{ord(text[exc.start]):04x})") from None
    if not text or text.isspace():
        raise _Bad(EMPTY_DOCUMENT, "empty document (no text, or only whitespace)")
    return text, domain
