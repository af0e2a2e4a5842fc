"""`tokenize`: corpora -> Megatron indexed datasets (one per domain), fast and in input order.

The parent process only reads chunks of whole lines and writes results. Workers parse and
check the lines, batch-encode the chunk's documents (SentencePiece or tokenizers, EOS appended) and
return numpy arrays. Results are consumed in submission order with a bounded number of chunks
in flight, so the output is the same for any worker count and memory stays flat.

Each input file is written as a part of its own, kept once finished (`outputs.FileParts`);
the final datasets are assembled from the parts in input order (`assemble`). So a rerun
redoes only the files not finished, a file that fails does not stop the others, and a shard
(`--num-shards`, `shards`) is the same run over its share of the files.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import typing
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .assemble import (
    MAX_DOMAINS,
    RECORD_FIELDS,
    SETTINGS,
    FileOutput,
    NoDocumentsError,
    file_record,
    reusable_files,
    write_outputs,
)
from .dedup import HASHES_SUFFIX, SeenDigests, digests, first_occurrences
from .errors import DataPrepError
from .indexed import IndexedDatasetWriter, token_dtype
from .lock import output_lock
from .outputs import FileParts, OutputSet
from .progress import progress
from .readers import BadLine, Chunk, expand_inputs, is_plain_text, parse_chunk, read_chunks
from .shards import Shard, assign_files
from .splits import TRAIN, sides, split_names, valid_prefix
from .tokenizer import Tokenizer, load_tokenizer
from .workers import OrderedPool

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
    shard: Shard | None = None  # None: all the files, written at output_prefix
    valid_fraction: float | None = None  # None: no validation split
    split_seed: int = 0
    dedup: str | None = None  # "exact": drop documents whose text came earlier


def tokenize(job: TokenizeJob) -> tuple[dict, bool]:
    """Run the job; returns (stats, fresh), fresh=False when an identical finished run is kept."""
    paths = expand_inputs(job.inputs)
    if job.domain_key and (plain := [path for path in paths if is_plain_text(path)]):
        raise DataPrepError(
            f"--domain-key reads a JSON field, but {plain[0]!r} is plain text; "
            "leave out --domain-key or give JSONL inputs"
        )
    companions = (valid_prefix(job.output_prefix),) if job.valid_fraction else ()
    tokenizer = load_tokenizer(job.tokenizer_model, job.eos_token)
    dtype = token_dtype(tokenizer.vocab_size)
    identities = [file_identity(path) for path in paths]
    run = _fingerprint(job, identities, tokenizer)
    mine, prefix = list(range(len(paths))), job.output_prefix
    if job.shard is not None:
        mine = assign_files([size for _, size, _ in identities], job.shard.count)[job.shard.index]
        prefix = job.shard.prefix(job.output_prefix)
        companions = tuple(job.shard.prefix(companion) for companion in companions)
        run["shard"] = [job.shard.index, job.shard.count]
    with output_lock(prefix):  # from clearing old outputs to the last rename
        outputs = OutputSet(prefix, companions)
        previous = outputs.previous_run(run, job.force, SETTINGS)
        if previous is not None and previous["run"] == run:
            return previous, False

        started = time.perf_counter()
        try:
            parts = outputs.parts({key: run[key] for key in SETTINGS if key in run})
            kept = reusable_files(previous, outputs.directory, identities) if previous is not None else {}
            done = {i: _part_output(parts, identities[i]) or kept.get(tuple(identities[i])) for i in mine}
            todo = [i for i in mine if done[i] is None]
            failures = _encode_files(parts, job, [(paths[i], identities[i]) for i in todo], dtype)
            if failures:
                raise DataPrepError(_describe_failures(failures, len(mine), outputs))
            for i in todo:
                done[i] = _part_output(parts, identities[i])
            header = {
                "tokenizer_model": job.tokenizer_model,
                "tokenizer_path": os.path.abspath(job.tokenizer_model),
                "eos_token": job.eos_token,
                "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id,
                "dtype": dtype.name,
            }
            tokenized = sum(done[i].record["tokens"] for i in todo)
            extra = {
                "tokenized_files": len(todo),
                "kept_files": len(mine) - len(todo),
                "workers": job.workers,
                "tokens_per_second": round(tokenized / (time.perf_counter() - started)),  # of the files tokenized now
            }
            files = [done[i] for i in mine]
            stats = write_outputs(outputs, run, header, files, job.domain_key is not None, extra, started)
            return stats, True
        except NoDocumentsError:
            outputs.abort(keep_parts=False)
            raise
        except BaseException:
            outputs.abort()
            raise


# ---------------------------------------------------------------- workers

_tokenizer: Tokenizer | None = None  # the worker's


@dataclass
class EncodedChunk:
    lines: int
    skipped: Counter
    first_bad: dict[str, BadLine]
    documents: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]  # (split, domain) -> (tokens, document lengths)
    digests: dict[tuple[str, str], np.ndarray]  # (split, domain) -> the documents' digests (with --dedup)
    duplicates: Counter  # domain -> documents dropped as repeats within the chunk


def _start_worker(model_path: str, eos_token: str | None) -> None:
    """Workers ignore Ctrl-C: the parent stops them and removes the partial output."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread each: the workers are the parallelism
    global _tokenizer
    _tokenizer = load_tokenizer(model_path, eos_token)


def encode_chunk(
    chunk: Chunk,
    json_key: str,
    domain_key: str | None,
    stop_at_first_bad: bool,
    dtype: np.dtype,
    valid_fraction: float | None,
    split_seed: int,
    dedup: bool,
) -> EncodedChunk:
    parsed = parse_chunk(chunk, json_key, domain_key, stop_at_first_bad)
    duplicates, rows = Counter(), None
    if dedup:
        rows = digests(parsed.texts)
        keep = first_occurrences(rows)
        duplicates.update(domain for domain, kept in zip(parsed.domains, keep) if not kept)
        parsed.texts = [text for text, kept in zip(parsed.texts, keep) if kept]
        parsed.domains = [domain for domain, kept in zip(parsed.domains, keep) if kept]
        rows = rows[keep]
    splits = sides(parsed.texts, valid_fraction, split_seed) if valid_fraction else [TRAIN] * len(parsed.texts)
    by_dataset: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)  # id arrays, a document's in order
    lengths: dict[tuple[str, str], list[int]] = defaultdict(list)
    positions: dict[tuple[str, str], list[int]] = defaultdict(list)
    encoded = _tokenizer.encode_documents(parsed.texts, dtype)
    for position, (split, domain, ids) in enumerate(zip(splits, parsed.domains, encoded)):
        by_dataset[split, domain] += ids
        lengths[split, domain].append(sum(map(len, ids)))
        positions[split, domain].append(position)
    documents = {
        key: (
            np.concatenate(arrays, dtype=dtype, casting="unsafe"),  # ids < vocab size fit dtype
            np.array(lengths[key], np.int32),
        )
        for key, arrays in by_dataset.items()
    }
    chunk_digests = {key: rows[indices] for key, indices in positions.items()} if dedup else {}
    return EncodedChunk(parsed.lines, parsed.skipped, parsed.first_bad, documents, chunk_digests, duplicates)


# ---------------------------------------------------------------- parent


def _encode_files(parts: FileParts, job: TokenizeJob, files: list[tuple[str, list]], dtype: np.dtype) -> dict:
    """Tokenize each file into a part of its own; returns {path: error} of the files that failed.

    A file that fails (unreadable, truncated, vanished, or a bad line under --on-error fail)
    leaves no part, and the next file starts: the others are finished either way."""
    fail = job.on_error == "fail"
    failures: dict[str, str] = {}
    started = time.perf_counter()
    context = multiprocessing.get_context(_START_METHOD)
    total_bytes = sum(size for _, (_, size, _) in files)
    current: _PartWriter | None = None
    documents = tokens = 0
    with (
        OrderedPool(context, job.workers, _start_worker, (job.tokenizer_model, job.eos_token)) as pool,
        progress(total_bytes, "tokenizing") as bar,
    ):
        tasks = _tasks(files, failures, job, dtype)
        try:
            for encoded, (index, done, file_done, ends) in pool.imap(encode_chunk, tasks, window=2 * job.workers + 2):
                path, identity = files[index]
                if current is not None and current.index != index:  # cut short by a read error
                    current.discard()
                    current = None
                if path in failures:
                    continue
                if fail and encoded.first_bad:
                    bad = next(iter(encoded.first_bad.values()))
                    failures[path] = (
                        f"{bad}\nFix or remove that line, or pass --on-error skip to skip bad lines "
                        f"(they are counted in {job.output_prefix}.stats.json)."
                    )
                    continue
                current = current or _PartWriter(
                    parts, index, identity, dtype, split_names(job.valid_fraction), job.dedup
                )
                current.add(encoded)
                documents += sum(len(lengths) for _, lengths in encoded.documents.values())
                tokens += sum(len(ids) for ids, _ in encoded.documents.values())
                if ends:
                    current.finish()
                    current = None
                elapsed = time.perf_counter() - started
                bar.set_postfix_str(
                    f"file {index + 1:,} of {len(files):,} ({os.path.basename(path)} "
                    f"{file_done / max(identity[1], 1):.0%}), "
                    f"{documents / elapsed:,.0f} docs/s, {tokens / elapsed:,.0f} tokens/s",
                    refresh=False,
                )
                bar.update(done - bar.n)
        finally:
            if current is not None:
                current.discard()
    return failures


def _tasks(files: list[tuple[str, list]], failures: dict, job: TokenizeJob, dtype: np.dtype) -> Iterator:
    """Each file's chunks, tagged (file index, bytes done in all, in this file, last chunk?);
    a file that cannot be read is put in `failures` and the next one starts."""
    fail = job.on_error == "fail"
    settings = (job.json_key, job.domain_key, fail, dtype, job.valid_fraction, job.split_seed, job.dedup is not None)
    before = 0
    for index, (path, (_, size, _)) in enumerate(files):
        try:
            for chunk, position in read_chunks(path):
                if path in failures:  # a bad line under --on-error fail: the rest is not needed
                    break
                yield (chunk, *settings), (index, before + position, position, False)
        except DataPrepError as exc:
            failures[path] = str(exc)
        except OSError as exc:  # e.g. deleted or moved while the run goes (shared filesystems)
            failures[path] = f"{path}: {exc.strerror or exc}"
        if path not in failures:  # an empty chunk ends the file, so that even an empty file gets its part
            yield (Chunk(path, 1, b""), *settings), (index, before + size, size, True)
        before += size


class _PartWriter:
    """One input file's datasets (one per domain) and record, written as a part."""

    def __init__(
        self, parts: FileParts, index: int, identity: list, dtype: np.dtype, splits: tuple[str, ...], dedup: str | None
    ):
        self.parts, self.index, self.identity, self.dtype, self.splits = parts, index, identity, dtype, splits
        self.directory = parts.start(identity)
        self.writers: dict[tuple[str, str], IndexedDatasetWriter] = {}
        self.digest_files: dict[tuple[str, str], typing.BinaryIO] = {}
        self.seen = SeenDigests() if dedup else None  # the file's documents so far
        self.duplicates: Counter | None = Counter() if dedup else None
        self.lines = 0
        self.skipped: Counter = Counter()
        self.first_skipped: dict[str, str] = {}

    def add(self, encoded: EncodedChunk) -> None:
        self.lines += encoded.lines
        self.skipped.update(encoded.skipped)
        for kind, bad in encoded.first_bad.items():
            self.first_skipped.setdefault(kind, str(bad))
        documents = self._drop_repeats(encoded) if self.seen is not None else encoded.documents
        for key, (tokens, lengths) in documents.items():
            if key not in self.writers:
                domains = {domain for _, domain in self.writers}
                if key[1] not in domains and len(domains) == MAX_DOMAINS:
                    raise DataPrepError(
                        f"the domain key has more than {MAX_DOMAINS} distinct values in {self.identity[0]} "
                        f"(the latest: {key[1]!r}); --domain-key should name a field with a few domain names"
                    )
                name = os.path.join(self.directory, str(len(self.writers)))
                self.writers[key] = IndexedDatasetWriter(name, self.dtype)
                if self.seen is not None:
                    self.digest_files[key] = open(name + HASHES_SUFFIX, "wb")
            self.writers[key].append(tokens, lengths)
            if self.seen is not None:
                self.digest_files[key].write(encoded.digests[key].tobytes())

    def _drop_repeats(self, encoded: EncodedChunk) -> dict:
        """The chunk's documents less those an earlier chunk of the file holds (encoded.digests
        shrinks alike); the chunk's own repeats were dropped by the worker."""
        self.duplicates.update(encoded.duplicates)
        kept = {}
        for key, (tokens, lengths) in encoded.documents.items():
            keep = ~self.seen.seen(encoded.digests[key])
            self.duplicates[key[1]] += int(np.count_nonzero(~keep))
            kept[key] = (tokens[np.repeat(keep, lengths)], lengths[keep])
            encoded.digests[key] = encoded.digests[key][keep]
        for rows in encoded.digests.values():
            self.seen.add(rows)
        return {key: value for key, value in kept.items() if len(value[1])}

    def finish(self) -> None:
        for writer in self.writers.values():
            writer.finish()
        for file in self.digest_files.values():
            file.close()
        counts = {key: [writer.documents, writer.tokens] for key, writer in self.writers.items()}
        record = file_record(
            self.identity, self.lines, self.skipped, self.first_skipped, counts, self.splits, self.duplicates
        )
        names = [[*key, os.path.basename(writer.prefix)] for key, writer in self.writers.items()]
        self.parts.finish(self.identity, {"record": record, "datasets": names})

    def discard(self) -> None:
        for writer in self.writers.values():
            writer.close()
        for file in self.digest_files.values():
            file.close()
        self.parts.discard(self.identity)


def _part_output(parts: FileParts, identity: list) -> FileOutput | None:
    part = parts.record(identity)
    if part is None:
        return None
    directory = parts.path(identity)
    record = part["record"]
    ranges = {
        (split, domain): (os.path.join(directory, name), 0, record[RECORD_FIELDS[split]][domain][0])
        for split, domain, name in part["datasets"]
    }
    return FileOutput(record, ranges)


def _describe_failures(failures: dict[str, str], files: int, outputs: OutputSet) -> str:
    finished = files - len(failures)
    kept = (
        f"the other {finished:,} input file{'s are' if finished != 1 else ' is'} finished and kept in "
        f"{outputs.staging}/, so rerunning the same command redoes only the failed ones"
        if finished
        else "nothing finished"
    )
    if len(failures) == 1:
        return f"{next(iter(failures.values()))}\n{kept}; no dataset written"
    listed = "\n".join(f"  {message}" for message in failures.values())
    return f"{len(failures):,} of {files:,} input files failed:\n{listed}\n{kept}; no dataset written"


def file_identity(path: str) -> list:
    """[absolute path, size, mtime]: a file with the same identity needs no new tokenizing."""
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def _fingerprint(job: TokenizeJob, identities: list[list], tokenizer: Tokenizer) -> dict:
    """Everything the output depends on: a rerun with the same fingerprint has nothing to do."""
    run = {
        "inputs": identities,
        "tokenizer_sha256": tokenizer.sha256,
        "json_key": job.json_key,
        "domain_key": job.domain_key,
        "on_error": job.on_error,
    }
    if job.valid_fraction:  # absent otherwise, so that runs without a split keep their fingerprint
        run |= {"valid_fraction": job.valid_fraction, "split_seed": job.split_seed}
    if job.dedup:
        run["dedup"] = job.dedup
    return run
