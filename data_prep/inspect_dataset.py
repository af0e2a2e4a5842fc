"""`inspect`: what a tokenized dataset (or a domain-split family) holds, as a short report.

Reads the files directly (memory-mapped, no torch import), so it answers in a fraction of a
second even for large datasets. Each dataset is checked first (`indexed.verify_dataset`), so
`inspect` also tells whether a copied or old dataset is complete.
"""

from __future__ import annotations

import json
import os
import random
import textwrap

import numpy as np

from .blend import SUFFIX, BlendFileError, read_blend_file
from .errors import DataPrepError
from .indexed import IndexedDatasetView, open_indexed_dataset
from .readers import BAD_LINE_KINDS, KIND_LABELS
from .tokenizer import load_tokenizer

FILES_SHOWN = 20


def inspect_dataset(
    prefix: str, tokenizer_model: str | None = None, samples: int = 1, max_chars: int = 400, seed: int = 0
) -> str:
    for suffix in (".bin", ".idx", ".blend.json", ".stats.json"):
        prefix = prefix.removesuffix(suffix)  # accept a file name too
    stats = _read_json(prefix + ".stats.json") or {}
    datasets = _open_all(prefix)
    lengths = np.concatenate([dataset.lengths for dataset in datasets.values()])
    tokens = int(lengths.sum(dtype=np.int64))
    dtype = next(iter(datasets.values())).dtype
    lines = [
        _row("dataset", f"{prefix}" + (f" ({len(datasets)} domains)" if _is_split(prefix) else "")),
        _row("documents", f"{len(lengths):,}"),
        _row(
            "tokens",
            f"{tokens:,} ({dtype.name}" + (f", vocabulary {stats['vocab_size']:,})" if "vocab_size" in stats else ")"),
        ),
    ]
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99]).round().astype(int)
    lines.append(
        _row(
            "doc length",
            f"min {lengths.min():,} · p50 {p50:,} · p90 {p90:,} · p99 {p99:,} · max {lengths.max():,} "
            "tokens (EOS included)",
        )
    )
    # The path as given to tokenize may be relative to another working directory.
    candidates = [tokenizer_model] if tokenizer_model else [stats.get("tokenizer_model"), stats.get("tokenizer_path")]
    model_path = next((path for path in candidates if path and os.path.exists(path)), candidates[0])
    eos_token = None if tokenizer_model else stats.get("eos_token")  # the run's --eos-token, with its tokenizer
    found = model_path and os.path.exists(model_path)
    tokenizer = load_tokenizer(model_path, eos_token) if found else None
    if tokenizer is not None:
        eos = tokenizer.eos_id
        without_eos = sum(int(np.count_nonzero(d.tokens[d.ends] != eos)) for d in datasets.values())
        lines.append(_row("ends in EOS", f"{len(lengths) - without_eos:,} of {len(lengths):,} documents (id {eos})"))
    if _is_split(prefix):
        lines.append(_row("domains", f"{'domain':<24} {'documents':>12} {'tokens':>15} {'share':>7}"))
        for domain, dataset in datasets.items():
            count = int(dataset.lengths.sum(dtype=np.int64))
            lines.append(_row("", f"{domain:<24} {len(dataset):>12,} {count:>15,} {count / max(tokens, 1):>7.1%}"))
    lines += _files(stats.get("per_file", []), prefix)
    if stats.get("skipped"):
        counts = {kind: stats["skipped"].get(kind, 0) for kind in BAD_LINE_KINDS}
        total = sum(counts.values())
        detail = ", ".join(f"{n:,} {KIND_LABELS[kind]}" for kind, n in counts.items() if n)
        lines.append(_row("skipped", f"{total:,} input lines: {detail}" if total else "no input lines"))
    lines += _samples(datasets, tokenizer, samples, max_chars, random.Random(seed))
    if tokenizer is None:
        lines.append(f"(token ids shown: tokenizer {model_path!r} not found; pass --tokenizer-model)")
    return "\n".join(lines)


def _open_all(prefix: str) -> dict[str, IndexedDatasetView]:
    """Domain (or "" for a single dataset) -> dataset."""
    if _is_split(prefix):
        try:
            blend = read_blend_file(prefix + SUFFIX)
        except BlendFileError as error:
            raise DataPrepError(str(error)) from None
        return {domain: open_indexed_dataset(blend.dataset_prefix(domain)) for domain in blend.domains}
    if os.path.exists(prefix + ".idx") and os.path.exists(prefix + ".bin"):
        return {"": open_indexed_dataset(prefix)}
    raise DataPrepError(f"no dataset at {prefix!r}: expected {prefix}.bin and {prefix}.idx, or {prefix}.blend.json")


def _samples(datasets, tokenizer, count: int, max_chars: int, rng: random.Random) -> list[str]:
    lines: list[str] = []
    for _ in range(count):
        domain = rng.choice(list(datasets))
        index = rng.randrange(len(datasets[domain]))
        ids = datasets[domain].document(index).tolist()
        text = tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))
        shown = text if len(text) <= max_chars else text[:max_chars] + f" … [{len(text) - max_chars:,} more characters]"
        where = f"document {index:,}" + (f" of {domain!r}" if domain else "")
        lines.append(_row("sample", f"{where} ({len(ids):,} tokens):"))
        lines.append(textwrap.indent(shown, "    │ ", lambda _: True))
    return lines


def _files(records: list[dict], prefix: str) -> list[str]:
    """Each input file's documents and tokens (the first FILES_SHOWN), as P.stats.json records them."""
    if not records:
        return []
    lines = [_row("files", f"{'input file':<24} {'documents':>12} {'tokens':>15} {'skipped':>8}")]
    for record in records[:FILES_SHOWN]:
        name = os.path.basename(record["input"][0])
        skipped = sum(record["skipped"].values())
        lines.append(_row("", f"{name:<24} {record['documents']:>12,} {record['tokens']:>15,} {skipped:>8,}"))
    if len(records) > FILES_SHOWN:
        lines.append(_row("", f"… and {len(records) - FILES_SHOWN:,} more input files (all in {prefix}.stats.json)"))
    return lines


def _is_split(prefix: str) -> bool:
    return os.path.exists(prefix + ".blend.json")


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def _row(label: str, value: str) -> str:
    return f"{label:<12}{value}"
