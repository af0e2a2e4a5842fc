"""`tokenize`: corpora -> Megatron indexed datasets (one per domain), fast and in input order.

The parent process only reads chunks of whole lines and writes results. Workers parse and
check the lines, batch-encode the chunk's documents with SentencePiece (EOS appended) and
return numpy arrays. Results are consumed in submission order with a bounded number of chunks
in flight, so the output is the same for any worker count and memory stays flat.
"""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
import os
import re
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from . import blend
from .errors import DataPrepError
from .files import file_sha256
from .indexed import IndexedDatasetWriter, token_dtype
from .lock import output_lock
from .outputs import OutputSet
from .progress import progress
from .readers import (
    BAD_LINE_KINDS,
    BadLine,
    Chunk,
    describe_inputs,
    describe_skipped,
    expand_inputs,
    is_plain_text,
    parse_chunk,
    read_chunks,
)
from .tokenizer import load_tokenizer
from .workers import OrderedPool

MAX_DOMAINS = 256  # two open files each; more usually means --domain-key names the wrong field
# fork where there is one: workers start in milliseconds, and callers of main() need no
# `if __name__ == "__main__"` guard (spawn re-imports the caller's main module).
_START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class TokenizeJob:
    inputs: list[str]
    output_prefix: str
    tokenizer_model: str
    json_key: str = "text"
    domain_key: str | None = None
    on_error: str = "fail"
    workers: int = field(default_factory=default_workers)
    force: bool = False


def tokenize(job: TokenizeJob) -> tuple[dict, bool]:
    """Run the job; returns (stats, fresh), fresh=False when an identical finished run is kept."""
    paths = expand_inputs(job.inputs)
    if job.domain_key and (plain := [path for path in paths if is_plain_text(path)]):
        raise DataPrepError(
            f"--domain-key reads a JSON field, but {plain[0]!r} is plain text; "
            "leave out --domain-key or give JSONL inputs"
        )
    processor = load_tokenizer(job.tokenizer_model)
    dtype = token_dtype(processor.vocab_size())
    with output_lock(job.output_prefix):  # from clearing old outputs to the last rename
        outputs = OutputSet(job.output_prefix)
        run = _fingerprint(job, paths)
        previous = outputs.finished_run(run, job.force)
        if previous is not None:
            return previous, False

        started = time.perf_counter()
        datasets = _DomainDatasets(outputs, dtype, split=job.domain_key is not None)
        try:
            lines, skipped, first_skipped = _encode_into(datasets, job, paths, dtype)
            datasets.finish()
            stats = _stats(run, job, paths, processor, dtype, datasets, lines, skipped, first_skipped)
            names = datasets.file_names()
            if job.domain_key:
                blend_name = os.path.basename(job.output_prefix) + blend.SUFFIX
                names.append(outputs.stage_json(blend_name, _blend(job, datasets, run["tokenizer_sha256"])))
            stats["seconds"] = round(time.perf_counter() - started, 3)
            stats["tokens_per_second"] = round(stats["tokens"] / stats["seconds"])
            return outputs.commit(names, stats), True
        except BaseException:
            datasets.close()
            outputs.abort()
            raise


# ---------------------------------------------------------------- workers

_processor: spm.SentencePieceProcessor | None = None
# SentencePiece needs about 35 bytes per character of the text it encodes at once (1.8 GB for
# a 50 MB document), so documents longer than LONG_CHARS are encoded in pieces of at most
# PIECE_CHARS characters (small pieces are also faster: 64 K encode 1.6x faster than 1 M).
LONG_CHARS = 1 << 20
PIECE_CHARS = 1 << 16


@dataclass
class EncodedChunk:
    lines: int
    skipped: Counter
    first_bad: dict[str, BadLine]
    documents: dict[str, tuple[np.ndarray, np.ndarray]]  # domain -> (tokens, document lengths)


def _start_worker(model_path: str) -> None:
    """Workers ignore Ctrl-C: the parent stops them and removes the partial output."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _processor
    _processor = spm.SentencePieceProcessor(model_file=model_path)


def encode_chunk(
    chunk: Chunk, json_key: str, domain_key: str | None, stop_at_first_bad: bool, dtype: np.dtype
) -> EncodedChunk:
    parsed = parse_chunk(chunk, json_key, domain_key, stop_at_first_bad)
    # One batch call for the chunk's ordinary documents: no Python call per document, and ids
    # come back as int32 buffers instead of lists of Python ints.
    short = [text for text in parsed.texts if len(text) <= LONG_CHARS]
    encoded = iter(_processor.encode(short, add_eos=True, return_type="numpy", num_threads=1))
    by_domain: dict[str, list[np.ndarray]] = defaultdict(list)  # id arrays, a document's in order
    lengths: dict[str, list[int]] = defaultdict(list)
    for domain, text in zip(parsed.domains, parsed.texts):
        ids = [next(encoded)] if len(text) <= LONG_CHARS else _encode_long(text, dtype)
        by_domain[domain] += ids
        lengths[domain].append(sum(map(len, ids)))
    documents = {
        domain: (
            np.concatenate(arrays, dtype=dtype, casting="unsafe"),  # ids < vocab size fit dtype
            np.array(lengths[domain], np.int32),
        )
        for domain, arrays in by_domain.items()
    }
    return EncodedChunk(parsed.lines, parsed.skipped, parsed.first_bad, documents)


def _encode_long(text: str, dtype: np.dtype) -> list[np.ndarray]:
    """The ids of a long document, encoded piece by piece in bounded memory.

    A piece ends before a space that follows a non-space character; the next piece starts with
    that space and is encoded without the dummy prefix, so each piece is normalized to exactly
    its part of the whole document's normalized text. The ids are then those of the whole
    document wherever no vocabulary piece holds a non-space character followed by "▁", as with
    SentencePiece's training defaults (split_by_whitespace=true, treat_whitespace_as_suffix=false)
    that train-tokenizer uses: BPE never merges across such a cut. A unigram model's best
    segmentation is cut there too, but its Viterbi search sums float scores over the text it is
    given, so where two segmentations score (nearly) alike, pieces and the whole document can
    choose differently (e.g. 12+8 vs 8+12 spaces): other tokens, the same text.
    Where PIECE_CHARS characters hold no such space, the piece is cut at its end: the tokens
    next to that cut can differ from whole-document encoding (nothing is merged across it),
    though they still decode to the same text with a model that keeps whitespace.
    """
    arrays = []
    processor, start = _processor, 0
    while start < len(text):
        end = _piece_end(text, start)
        ids = processor.encode(text[start:end], add_eos=end == len(text), return_type="numpy")
        arrays.append(ids.astype(dtype, casting="unsafe"))  # halves what waits for the next pieces
        processor, start = _continuation_processor(), end
    return arrays


def _piece_end(text: str, start: int) -> int:
    end = start + PIECE_CHARS
    if end >= len(text):
        return len(text)
    cut = text.rfind(" ", start + 1, end)
    while cut > start and text[cut - 1].isspace():
        cut = text.rfind(" ", start + 1, cut)
    return cut if cut > start else end


@functools.cache
def _continuation_processor() -> spm.SentencePieceProcessor:
    """The worker's model without the dummy prefix ("▁" put before the text), for pieces after
    the first. A model that removes extra whitespace strips the space a piece starts with, so
    there the dummy prefix stays: it puts back the "▁" that the whole document has there (and
    adds one at a cut that is not before a space)."""
    model = sentencepiece_model_pb2.ModelProto.FromString(_processor.serialized_model_proto())
    model.normalizer_spec.add_dummy_prefix = model.normalizer_spec.remove_extra_whitespaces
    return spm.SentencePieceProcessor(model_proto=model.SerializeToString())


# ---------------------------------------------------------------- parent


def _encode_into(
    datasets: _DomainDatasets, job: TokenizeJob, paths: list[str], dtype: np.dtype
) -> tuple[int, Counter, dict[str, BadLine]]:
    fail = job.on_error == "fail"
    lines, skipped, first_skipped = 0, Counter(), {}
    started = time.perf_counter()
    context = multiprocessing.get_context(_START_METHOD)
    total_bytes = sum(os.path.getsize(path) for path in paths)
    with (
        OrderedPool(context, job.workers, _start_worker, (job.tokenizer_model,)) as pool,
        progress(total_bytes, "tokenizing") as bar,
    ):
        tasks = (((chunk, job.json_key, job.domain_key, fail, dtype), done) for chunk, done in _chunks(paths))
        for encoded, done in pool.imap(encode_chunk, tasks, window=2 * job.workers + 2):
            if fail and encoded.first_bad:
                bad = next(iter(encoded.first_bad.values()))
                raise DataPrepError(
                    f"{bad}\nFix or remove that line, or pass --on-error skip to skip bad lines "
                    f"(they are counted in {job.output_prefix}.stats.json)."
                )
            lines += encoded.lines
            skipped.update(encoded.skipped)
            for kind, bad in encoded.first_bad.items():
                first_skipped.setdefault(kind, bad)
            for domain, (tokens, lengths) in encoded.documents.items():
                datasets.append(domain, tokens, lengths)
            elapsed = time.perf_counter() - started
            bar.set_postfix_str(
                f"{datasets.documents / elapsed:,.0f} docs/s, {datasets.tokens / elapsed:,.0f} tokens/s",
                refresh=False,
            )
            bar.update(done - bar.n)
    if not datasets.documents:
        found = f"; {describe_skipped(skipped)}" if skipped else " (the inputs are empty)"
        raise DataPrepError(f"no documents in {describe_inputs(paths)}{found}")
    return lines, skipped, first_skipped


def _chunks(paths: list[str]) -> Iterator[tuple[Chunk, int]]:
    """All chunks of all inputs, each with the on-disk (compressed) bytes read up to its end."""
    done = 0
    for path in paths:
        for chunk, position in read_chunks(path):
            yield chunk, done + position
        done += os.path.getsize(path)


class _DomainDatasets:
    """One dataset per domain (or a single one), created when the domain is first seen."""

    def __init__(self, outputs: OutputSet, dtype: np.dtype, split: bool):
        self.outputs, self.dtype, self.split = outputs, dtype, split
        self.base = os.path.basename(outputs.prefix)
        self.writers: dict[str, IndexedDatasetWriter] = {}
        self.prefixes: dict[str, str] = {}  # domain -> dataset prefix relative to the output dir
        self.documents = 0
        self.tokens = 0

    def append(self, domain: str, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if domain not in self.writers:
            self._open(domain)
        self.writers[domain].append(tokens, lengths)
        self.documents += len(lengths)
        self.tokens += len(tokens)

    def finish(self) -> None:
        for writer in self.writers.values():
            writer.finish()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def file_names(self) -> list[str]:
        return [prefix + suffix for prefix in self.prefixes.values() for suffix in (".bin", ".idx")]

    def _open(self, domain: str) -> None:
        if len(self.writers) == MAX_DOMAINS:
            raise DataPrepError(
                f"the domain key has more than {MAX_DOMAINS} distinct values (the latest: "
                f"{domain!r}); --domain-key should name a field with a few domain names"
            )
        prefix = self.base
        if self.split:
            prefix = f"{self.base}_{re.sub(r'[^A-Za-z0-9_-]', '_', domain)}"
            if prefix in self.prefixes.values():  # another name sanitised to the same file name
                prefix += "-" + hashlib.sha1(domain.encode()).hexdigest()[:8]
        self.prefixes[domain] = prefix
        self.writers[domain] = IndexedDatasetWriter(self.outputs.staged(prefix), self.dtype)


def _fingerprint(job: TokenizeJob, paths: list[str]) -> dict:
    """Everything the output depends on: a rerun with the same fingerprint has nothing to do."""
    return {
        "inputs": [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths],
        "tokenizer_sha256": file_sha256(job.tokenizer_model),
        "json_key": job.json_key,
        "domain_key": job.domain_key,
        "on_error": job.on_error,
    }


def _stats(run, job, paths, processor, dtype, datasets, lines, skipped, first_skipped) -> dict:
    return {
        "run": run,
        "tokenizer_model": job.tokenizer_model,
        "tokenizer_path": os.path.abspath(job.tokenizer_model),
        "vocab_size": processor.vocab_size(),
        "eos_id": processor.eos_id(),
        "dtype": dtype.name,
        "input_files": len(paths),
        "input_bytes": sum(os.path.getsize(path) for path in paths),
        "lines": lines,
        "documents": datasets.documents,
        "tokens": datasets.tokens,
        "skipped": {kind: skipped[kind] for kind in BAD_LINE_KINDS},
        "first_skipped": {kind: str(bad) for kind, bad in first_skipped.items()},
        "datasets": [
            {
                "prefix": datasets.prefixes[domain],
                "domain": domain if datasets.split else None,
                "documents": writer.documents,
                "tokens": writer.tokens,
            }
            for domain, writer in sorted(datasets.writers.items())
        ],
        "workers": job.workers,
    }


def _blend(job: TokenizeJob, datasets: _DomainDatasets, tokenizer_sha256: str) -> dict:
    """Domain -> dataset prefix (relative to the blend file) and natural (token-share) weight."""
    domains = {
        domain: blend.Domain(
            prefix=datasets.prefixes[domain],
            documents=writer.documents,
            tokens=writer.tokens,
            weight=writer.tokens / datasets.tokens,
        )
        for domain, writer in sorted(datasets.writers.items())
    }
    path = job.output_prefix + blend.SUFFIX
    return blend.BlendFile(Path(path), domains, job.tokenizer_model, tokenizer_sha256).to_json()
