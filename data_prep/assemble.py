"""Final datasets put together from per-file pieces, in input order, whatever made the pieces.

Every input file's documents are one contiguous range of documents per split and domain, in
a dataset of its own (a file just tokenized, under `P.incomplete/parts/`), of a finished run
(a file unchanged since, found through that run's `per_file` records) or of a shard
(`merge`). The final `.bin` is those ranges' tokens laid end to end in input-file order (with
--dedup, less the documents that repeat those of earlier files: `dedup`), and its `.idx` is
rebuilt from their lengths, so the output depends only on the inputs and settings: not on
how files were spread over shards, which were reused, or how many workers encoded them.
Everything is streamed in blocks through open files (no memory maps, no Python lists), so
memory stays flat for any number of documents (with --dedup, plus the digests seen: `dedup`).
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import struct
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import blend
from .dedup import HASHES_SUFFIX, SeenDigests, read_digests
from .errors import DataPrepError
from .indexed import _HEADER_BYTES, IndexedDatasetWriter, _verified_header
from .outputs import OutputSet
from .progress import progress
from .readers import BAD_LINE_KINDS, describe_inputs, describe_skipped
from .splits import TRAIN, VALID, split_names, valid_prefix

MAX_DOMAINS = 256  # two open files each; more usually means --domain-key names the wrong field
_TOKEN_BLOCK = 1 << 24  # tokens copied at once
_LENGTH_BLOCK = 1 << 20  # document lengths copied at once

# The settings a run's output depends on besides its input files; shards to be merged, and
# the finished files a rerun keeps, must agree on all of them.
SETTINGS = ("tokenizer_sha256", "json_key", "domain_key", "on_error", "valid_fraction", "split_seed", "dedup")
# A file's documents per domain in its record: the training (or only) side, and validation.
RECORD_FIELDS = {TRAIN: "domains", VALID: "valid_domains"}


class NoDocumentsError(DataPrepError):
    """The inputs hold no documents: nothing of the run is worth keeping."""


@dataclass(frozen=True)
class FileOutput:
    """One input file's documents: its `per_file` record and, per domain, where they are."""

    record: dict  # the file's entry in P.stats.json's "per_file"
    # (split, domain) -> (dataset prefix, first document, documents)
    ranges: dict[tuple[str, str], tuple[str, int, int]]


def file_record(
    identity: list,
    lines: int,
    skipped: Counter,
    first_skipped: dict,
    counts: dict,
    splits: tuple[str, ...],
    duplicates: Counter | None = None,
) -> dict:
    """`identity` is [path, size, mtime_ns]; `counts` maps (split, domain) -> [documents, tokens];
    `duplicates` (with --dedup), domain -> documents dropped."""
    sides = {
        RECORD_FIELDS[split]: {domain: count for (side, domain), count in sorted(counts.items()) if side == split}
        for split in splits
    }
    return {
        "input": identity,
        "lines": lines,
        "documents": sum(documents for documents, _ in counts.values()),
        "tokens": sum(tokens for _, tokens in counts.values()),
        **sides,
        **({"duplicates": dict(sorted(duplicates.items()))} if duplicates is not None else {}),
        "skipped": {kind: skipped[kind] for kind in BAD_LINE_KINDS if skipped[kind]},
        "first_skipped": first_skipped,
    }


def finished_files(stats: dict, directory: str) -> dict[tuple, FileOutput]:
    """The files of a finished run (or shard) by identity, located in its datasets."""
    prefixes = {
        (dataset.get("split", TRAIN), dataset["domain"] or ""): os.path.join(directory, dataset["prefix"])
        for dataset in stats["datasets"]
    }
    first = Counter()
    found = {}
    for record in stats.get("per_file", []):
        ranges = {}
        for split, name in RECORD_FIELDS.items():
            for domain, (documents, _) in record.get(name, {}).items():
                key = (split, domain)
                ranges[key] = (prefixes[key], first[key], documents)
                first[key] += documents
        found[tuple(record["input"])] = FileOutput(record, ranges)
    return found


def reusable_files(stats: dict, directory: str, inputs: list[list]) -> dict[tuple, FileOutput]:
    """The files of a finished run that a rerun over `inputs` may take as they are. With
    --dedup a file there lacks the repeats of the files before it in that run: it is taken only
    if all of those come before it in `inputs` too (then deduplicating it again is exact)."""
    found = finished_files(stats, directory)
    if not stats["run"].get("dedup"):
        return found
    position = {tuple(identity): index for index, identity in enumerate(inputs)}
    latest = -1  # the latest position now of the files before this one then
    for record in stats.get("per_file", []):
        identity = tuple(record["input"])
        now = position.get(identity, len(inputs))
        if latest >= now:
            found.pop(identity)
        latest = max(latest, now)
    return found


def dataset_prefixes(base: str, domains: Iterable[str], by_domain: bool) -> dict[str, str]:
    """Domain -> dataset prefix; names that sanitise alike get a hash, in sorted order, so the
    names depend only on the set of domains."""
    if not by_domain:
        return {"": base}
    prefixes: dict[str, str] = {}
    for domain in sorted(domains):
        prefix = f"{base}_{re.sub(r'[^A-Za-z0-9_-]', '_', domain)}"
        if prefix in prefixes.values():
            prefix += "-" + hashlib.sha1(domain.encode()).hexdigest()[:8]
        prefixes[domain] = prefix
    return prefixes


def write_outputs(
    outputs: OutputSet, run: dict, header: dict, files: list[FileOutput], by_domain: bool, extra: dict, started: float
) -> dict:
    """Assemble one dataset per split and domain from `files` (in this order), stage the blend
    files and the stats, and commit them; returns the stats. `header` holds the tokenizer's
    fields (tokenizer_model, tokenizer_path, eos_token, vocab_size, eos_id, dtype); `started`, the run's
    start (time.perf_counter())."""
    domains = sorted({domain for file in files for _, domain in file.ranges})
    if len(domains) > MAX_DOMAINS:
        raise DataPrepError(
            f"the domain key has {len(domains)} distinct values, more than {MAX_DOMAINS} (e.g. "
            f"{domains[MAX_DOMAINS]!r}); --domain-key should name a field with a few domain names"
        )
    dedup = bool(run.get("dedup"))
    files, keep = _drop_repeats_of_earlier_files(files) if dedup else (files, {})
    records = [file.record for file in files]
    documents = sum(record["documents"] for record in records)
    if not documents:
        skipped = Counter()
        for record in records:
            skipped.update(record["skipped"])
        found = f"; {describe_skipped(skipped)}" if skipped else " (the inputs are empty)"
        raise NoDocumentsError(f"no documents in {describe_inputs([record['input'][0] for record in records])}{found}")
    splits = split_names(run.get("valid_fraction"))
    keys = [(split, domain) for split in splits for domain in domains]
    _refuse_empty_sides(keys, files, run)
    bases = {TRAIN: outputs.prefix, VALID: valid_prefix(outputs.prefix) if VALID in splits else None}
    prefixes = {
        (split, domain): prefix
        for split in splits
        for domain, prefix in dataset_prefixes(os.path.basename(bases[split]), domains, by_domain).items()
    }
    dtype = np.dtype(header["dtype"])
    datasets = []
    total_bytes = sum(record["tokens"] for record in records) * dtype.itemsize
    with progress(total_bytes, "assembling") as bar:
        for key in keys:
            writer = IndexedDatasetWriter(outputs.staged(prefixes[key]), dtype)
            hashes = open(outputs.staged(prefixes[key]) + HASHES_SUFFIX, "wb") if dedup else None
            try:
                for index, file in enumerate(files):
                    if key in file.ranges:
                        before = writer.tokens
                        kept = keep.get((index, key))
                        copy_documents(writer, *file.ranges[key], kept)
                        if hashes is not None:
                            rows = read_digests(*file.ranges[key])
                            hashes.write((rows if kept is None else rows[kept]).tobytes())
                        bar.update((writer.tokens - before) * dtype.itemsize)
                writer.finish()
            except BaseException:
                writer.close()
                raise
            finally:
                if hashes is not None:
                    hashes.close()
            datasets.append(
                {
                    "prefix": prefixes[key],
                    "split": key[0],
                    "domain": key[1] if by_domain else None,
                    "documents": writer.documents,
                    "tokens": writer.tokens,
                }
            )
    suffixes = (".bin", ".idx", HASHES_SUFFIX) if dedup else (".bin", ".idx")
    names = [dataset["prefix"] + suffix for dataset in datasets for suffix in suffixes]
    if by_domain:
        for split in splits:
            side = [dataset for dataset in datasets if dataset["split"] == split]
            name = os.path.basename(bases[split]) + blend.SUFFIX
            names.append(outputs.stage_json(name, _blend(bases[split], header, run, side)))
    skipped, first_skipped = Counter(), {}
    for record in records:
        skipped.update(record["skipped"])
        for kind, bad in record["first_skipped"].items():
            first_skipped.setdefault(kind, bad)
    stats = {
        "run": run,
        **header,
        "input_files": len(records),
        "input_bytes": sum(record["input"][1] for record in records),
        "lines": sum(record["lines"] for record in records),
        "documents": documents,
        "tokens": sum(dataset["tokens"] for dataset in datasets),
        "skipped": {kind: skipped[kind] for kind in BAD_LINE_KINDS},
        "first_skipped": {kind: first_skipped[kind] for kind in BAD_LINE_KINDS if kind in first_skipped},
        "datasets": datasets,
        **({"duplicates": _total_duplicates(records)} if dedup else {}),
        **extra,
        "seconds": round(time.perf_counter() - started, 3),
        "per_file": records,
    }
    return outputs.commit(names, stats)


def _drop_repeats_of_earlier_files(files: list[FileOutput]) -> tuple[list[FileOutput], dict]:
    """The files with records that count what is left and what was dropped, and (file index,
    dataset key) -> the documents kept, where a file's documents repeat those of earlier files."""
    seen = SeenDigests()
    keep = {}
    counted = []
    for index, file in enumerate(files):
        record = copy.deepcopy(file.record)
        found = {key: read_digests(*where) for key, where in file.ranges.items()}
        for key, rows in found.items():
            repeats = seen.seen(rows)
            if not repeats.any():
                continue
            keep[index, key] = ~repeats
            prefix, first, count = file.ranges[key]
            dropped_tokens = int(_lengths(prefix, first, count)[repeats].sum(dtype=np.int64))
            counts = record[RECORD_FIELDS[key[0]]][key[1]]
            counts[0] -= int(repeats.sum())
            counts[1] -= dropped_tokens
            record["documents"] -= int(repeats.sum())
            record["tokens"] -= dropped_tokens
            record["duplicates"][key[1]] = record["duplicates"].get(key[1], 0) + int(repeats.sum())
            record["duplicates"] = dict(sorted(record["duplicates"].items()))
        for key, rows in found.items():
            seen.add(rows if (index, key) not in keep else rows[keep[index, key]])
        counted.append(FileOutput(record, file.ranges))
    return counted, keep


def _lengths(prefix: str, first: int, count: int) -> np.ndarray:
    _verified_header(prefix)
    with open(prefix + ".idx", "rb") as index:
        index.seek(_HEADER_BYTES + 4 * first)
        return np.fromfile(index, np.int32, count)


def _total_duplicates(records: list[dict]) -> dict[str, int]:
    total = Counter()
    for record in records:
        total.update(record["duplicates"])
    return dict(sorted(total.items()))


def _refuse_empty_sides(keys: list[tuple[str, str]], files: list[FileOutput], run: dict) -> None:
    """With a split, every domain needs documents on both sides: a validation blend is read
    with the training blend's domains, and an empty dataset has nothing to train on."""
    if not run.get("valid_fraction"):
        return
    held = Counter()
    for file in files:
        for key, (_, _, count) in file.ranges.items():
            held[key] += count
    empty = [key for key in keys if not held[key]]
    if empty:
        split, domain = empty[0]
        where = f"domain {domain!r}" if domain else "the data"
        others = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        change = "raise" if split == VALID else "lower"
        raise DataPrepError(
            f"--valid-fraction {run['valid_fraction']} leaves {where}{others} with no {split} documents; "
            f"{change} it, so that both sides hold documents of every domain"
        )


def copy_documents(
    writer: IndexedDatasetWriter, prefix: str, first: int, count: int, keep: np.ndarray | None = None
) -> None:
    """Append documents first .. first + count - 1 of the dataset `prefix` to `writer`, only
    those `keep` marks if given (one copy per run of kept documents)."""
    if keep is not None:
        edges = np.flatnonzero(np.diff(np.concatenate([[False], keep, [False]]).astype(np.int8)))
        for start, stop in zip(edges[0::2], edges[1::2]):
            copy_documents(writer, prefix, first + int(start), int(stop - start))
        return
    dtype, total = _verified_header(prefix)
    if first + count > total:
        raise DataPrepError(f"{prefix}.idx holds {total:,} documents, not the {first + count:,} its stats record")
    nothing = np.empty(0, np.int32)
    with open(prefix + ".idx", "rb") as index, open(prefix + ".bin", "rb") as tokens:
        index.seek(_HEADER_BYTES + 4 * total + 8 * first)
        (start,) = struct.unpack("<q", index.read(8))
        index.seek(_HEADER_BYTES + 4 * first)
        tokens.seek(start)
        for done in range(0, count, _LENGTH_BLOCK):
            lengths = np.fromfile(index, np.int32, min(_LENGTH_BLOCK, count - done))
            writer.append(np.empty(0, dtype), lengths)
            remaining = int(lengths.sum(dtype=np.int64))
            while remaining:
                block = np.fromfile(tokens, dtype, min(_TOKEN_BLOCK, remaining))
                if not len(block):
                    raise DataPrepError(f"{prefix}.bin ends before the documents its index describes")
                writer.append(block, nothing)
                remaining -= len(block)


def _blend(prefix: str, header: dict, run: dict, datasets: list[dict]) -> dict:
    """Domain -> dataset prefix (relative to the blend file) and natural (token-share) weight."""
    tokens = sum(dataset["tokens"] for dataset in datasets)
    domains = {
        dataset["domain"]: blend.Domain(
            prefix=dataset["prefix"],
            documents=dataset["documents"],
            tokens=dataset["tokens"],
            weight=dataset["tokens"] / tokens,
        )
        for dataset in datasets
    }
    path = Path(prefix + blend.SUFFIX)
    return blend.BlendFile(path, domains, header["tokenizer_model"], run["tokenizer_sha256"]).to_json()
