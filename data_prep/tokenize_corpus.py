"""`tokenize`: corpora -> Megatron indexed datasets (one per domain), fast and in input order.

The parent process only reads chunks of whole lines and writes results. Workers parse and
check the lines, batch-encode the chunk's documents (SentencePiece or tokenizers, EOS appended) and
return numpy arrays. Results are consumed in submission order with a bounded number of chunks
in flight, so the output is the same for any worker count and memory stays flat.
"""

from __future__ import annotations

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

from . import blend
from .errors import DataPrepError
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
from .tokenizer import Tokenizer, load_tokenizer
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
    eos_token: str | None = None  # for a tokenizer.json; None: its tokenizer_config.json's
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
    tokenizer = load_tokenizer(job.tokenizer_model, job.eos_token)
    dtype = token_dtype(tokenizer.vocab_size)
    with output_lock(job.output_prefix):  # from clearing old outputs to the last rename
        outputs = OutputSet(job.output_prefix)
        run = _fingerprint(job, paths, tokenizer)
        previous = outputs.finished_run(run, job.force)
        if previous is not None:
            return previous, False

        started = time.perf_counter()
        datasets = _DomainDatasets(outputs, dtype, split=job.domain_key is not None)
        try:
            lines, skipped, first_skipped = _encode_into(datasets, job, paths, dtype)
            datasets.finish()
            stats = _stats(run, job, paths, tokenizer, dtype, datasets, lines, skipped, first_skipped)
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

_tokenizer: Tokenizer | None = None  # the worker's


@dataclass
class EncodedChunk:
    lines: int
    skipped: Counter
    first_bad: dict[str, BadLine]
    documents: dict[str, tuple[np.ndarray, np.ndarray]]  # domain -> (tokens, document lengths)


def _start_worker(model_path: str, eos_token: str | None) -> None:
    """Workers ignore Ctrl-C: the parent stops them and removes the partial output."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread each: the workers are the parallelism
    global _tokenizer
    _tokenizer = load_tokenizer(model_path, eos_token)


def encode_chunk(
    chunk: Chunk, json_key: str, domain_key: str | None, stop_at_first_bad: bool, dtype: np.dtype
) -> EncodedChunk:
    parsed = parse_chunk(chunk, json_key, domain_key, stop_at_first_bad)
    by_domain: dict[str, list[np.ndarray]] = defaultdict(list)  # id arrays, a document's in order
    lengths: dict[str, list[int]] = defaultdict(list)
    for domain, ids in zip(parsed.domains, _tokenizer.encode_documents(parsed.texts, dtype)):
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
        OrderedPool(context, job.workers, _start_worker, (job.tokenizer_model, job.eos_token)) as pool,
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


def _fingerprint(job: TokenizeJob, paths: list[str], tokenizer: Tokenizer) -> dict:
    """Everything the output depends on: a rerun with the same fingerprint has nothing to do."""
    return {
        "inputs": [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths],
        "tokenizer_sha256": tokenizer.sha256,
        "json_key": job.json_key,
        "domain_key": job.domain_key,
        "on_error": job.on_error,
    }


def _stats(run, job, paths, tokenizer, dtype, datasets, lines, skipped, first_skipped) -> dict:
    return {
        "run": run,
        "tokenizer_model": job.tokenizer_model,
        "tokenizer_path": os.path.abspath(job.tokenizer_model),
        "eos_token": job.eos_token,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
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
