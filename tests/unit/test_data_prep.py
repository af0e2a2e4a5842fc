"""data_prep: what users rely on, through the real CLI (subprocesses) and real file formats."""

from __future__ import annotations

import codecs
import contextlib
import gzip
import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import zstandard
from helpers import REPO

from data_prep import indexed, tokenize_corpus
from data_prep.errors import DataPrepError
from data_prep.readers import Chunk, read_chunks
from data_prep.tokenizer import SentencePieceTokenizer, train_tokenizer
from data_prep.workers import OrderedPool

WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this be or "
    "has had not but first one their its new after who they have two been more also other data "
    "model train token loss weight sample python def return import class self"
).split()


def make_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> str:
    """A tiny BPE model (vocab 400), trained once per session on generated text."""
    directory = tmp_path_factory.mktemp("tokenizer")
    rng = random.Random(0)
    corpus = directory / "corpus.jsonl"
    with corpus.open("w") as out:
        for _ in range(1000):
            lines = [make_text(rng, rng.randint(5, 30)) + "." for _ in range(3)]
            out.write(json.dumps({"text": "\n".join(lines)}) + "\n")
    train_tokenizer([str(corpus)], str(directory / "tok"), vocab_size=400)
    return str(directory / "tok.model")


@pytest.fixture(scope="session")
def processor(tokenizer) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=tokenizer)


@pytest.fixture(scope="session")
def IndexedDataset():
    """Megatron-Core's reader, exactly what training uses (imported once: it pulls in torch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *args], cwd=cwd, env=_env(), capture_output=True, text=True
    )


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def write_jsonl(path: Path, records: list, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as out:
        for record in records:
            out.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def documents(dataset) -> list[list[int]]:
    return [dataset[i].tolist() for i in range(len(dataset))]


def sample_texts(count: int = 40, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    texts = [make_text(rng, rng.randint(1, 80)) for _ in range(count)]
    # Things a real corpus has: indentation, newlines, tabs, characters the tokenizer never saw.
    texts += ["def f(x):\n    return x  # ok\n\n\tdone", "Grüße, 世界! 🙂 naïve café", "a\r\nb"]
    return texts


# ---------------------------------------------------------------- round trip and format


def test_tokens_read_back_equal_sentencepiece_encoding_plus_eos(tmp_path, tokenizer, processor, IndexedDataset):
    texts = sample_texts()
    write_jsonl(tmp_path / "in.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    result = run_cli(
        "tokenize",
        "--input",
        "in.jsonl",
        "--output-prefix",
        "out/train",
        "--tokenizer-model",
        tokenizer,
        "--workers",
        "2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr

    dataset = IndexedDataset(str(tmp_path / "out/train"))
    assert dataset.index.dtype == np.uint16  # smallest dtype for a 400-piece vocabulary
    eos = processor.eos_id()
    assert documents(dataset) == [processor.encode(t) + [eos] for t in texts]
    # byte fallback and identity normalization: text comes back exactly
    assert [processor.decode(doc[:-1]) for doc in documents(dataset)] == texts

    stats = json.loads((tmp_path / "out/train.stats.json").read_text())
    assert stats["documents"] == len(texts)
    assert stats["tokens"] == sum(len(processor.encode(t)) + 1 for t in texts)
    assert "total" in result.stdout and "tokens/s" in result.stdout


def test_index_is_byte_identical_to_megatron_builder(tmp_path, monkeypatch):
    """Also across the writer's internal blocks, where the byte offsets carry over."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    monkeypatch.setattr(indexed, "_BLOCK", 3)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 400, size=int(rng.integers(1, 50))) for _ in range(11)]

    builder = IndexedDatasetBuilder(str(tmp_path / "megatron.bin"), dtype=np.uint16)
    for doc in docs:
        builder.add_item(torch.IntTensor(doc))
        builder.end_document()
    builder.finalize(str(tmp_path / "megatron.idx"))

    writer = indexed.IndexedDatasetWriter(str(tmp_path / "ours"), np.uint16)
    writer.append(np.concatenate(docs[:4]), np.array([len(d) for d in docs[:4]]))
    writer.append(np.concatenate(docs[4:]), np.array([len(d) for d in docs[4:]]))
    writer.finish()

    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"megatron{suffix}").read_bytes()


def test_compressed_and_text_inputs_give_the_same_dataset(tmp_path, tokenizer):
    texts = [t.replace("\r", "") for t in sample_texts()]
    lines = [json.dumps({"text": t}) for t in texts]
    write_jsonl(tmp_path / "plain.jsonl", lines)
    write_jsonl(tmp_path / "in.jsonl.gz", lines, opener=gzip.open)
    # several zstd frames, as produced by concatenating compressed shards
    frames = [
        zstandard.ZstdCompressor().compress("".join(line + "\n" for line in part).encode())
        for part in (lines[:10], lines[10:])
    ]
    (tmp_path / "in.jsonl.zst").write_bytes(b"".join(frames))
    (tmp_path / "docs.txt").write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n")
    write_jsonl(tmp_path / "flat.jsonl", [{"text": t.replace("\n", " ")} for t in texts])

    outputs = {}
    for name in ("plain.jsonl", "in.jsonl.gz", "in.jsonl.zst", "docs.txt", "flat.jsonl"):
        result = run_cli(
            "tokenize", "--input", name, "--output-prefix", f"out_{name}", "--tokenizer-model", tokenizer, cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
        outputs[name] = [(tmp_path / f"out_{name}{s}").read_bytes() for s in (".bin", ".idx")]
    assert outputs["plain.jsonl"] == outputs["in.jsonl.gz"] == outputs["in.jsonl.zst"]
    assert outputs["docs.txt"] == outputs["flat.jsonl"]


def test_worker_count_does_not_change_the_output(tmp_path, tokenizer):
    rng = random.Random(2)
    # about 3 MB: several 512 KiB chunks, so the workers really share the work
    write_jsonl(tmp_path / "big.jsonl", [{"text": make_text(rng, 600)} for _ in range(1400)])
    files = []
    for workers in ("1", "3"):
        result = run_cli(
            "tokenize",
            "--input",
            "big.jsonl",
            "--output-prefix",
            f"w{workers}",
            "--tokenizer-model",
            tokenizer,
            "--workers",
            workers,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        files.append([(tmp_path / f"w{workers}{s}").read_bytes() for s in (".bin", ".idx")])
    assert files[0] == files[1]


def test_a_byte_order_mark_is_not_part_of_the_first_document(tmp_path, tokenizer):
    """Windows editors start UTF-8 files with one; it must not make line 1 malformed JSON."""
    texts = sample_texts(5)
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    text_data = "".join(t.replace("\n", " ").replace("\r", " ") + "\n" for t in texts).encode()
    inputs = {
        "plain.jsonl": data,
        "bom.jsonl": codecs.BOM_UTF8 + data,
        "bom.jsonl.gz": gzip.compress(codecs.BOM_UTF8 + data),
        "bom.jsonl.zst": zstandard.ZstdCompressor().compress(codecs.BOM_UTF8 + data),
        "plain.txt": text_data,
        "bom.txt": codecs.BOM_UTF8 + text_data,
    }
    outputs = {}
    for name, content in inputs.items():
        (tmp_path / name).write_bytes(content)
        result = run_cli(
            "tokenize", "--input", name, "--output-prefix", f"out_{name}", "--tokenizer-model", tokenizer, cwd=tmp_path
        )  # --on-error fail
        assert result.returncode == 0, result.stderr
        outputs[name] = [(tmp_path / f"out_{name}{s}").read_bytes() for s in (".bin", ".idx")]
    assert outputs["plain.jsonl"] == outputs["bom.jsonl"] == outputs["bom.jsonl.gz"] == outputs["bom.jsonl.zst"]
    assert outputs["plain.txt"] == outputs["bom.txt"]


def test_a_long_document_is_encoded_in_pieces_with_the_tokens_of_the_whole(tokenizer, processor, monkeypatch):
    """Cut points are at spaces after non-space characters (not inside indentation), and the
    ordinary documents around the long one keep their order; small sizes stand in for 1 MB."""
    model = SentencePieceTokenizer(tokenizer)
    monkeypatch.setattr(tokenize_corpus, "_tokenizer", model)
    monkeypatch.setattr(SentencePieceTokenizer, "LONG_CHARS", 2000)
    monkeypatch.setattr(SentencePieceTokenizer, "PIECE_CHARS", 300)
    long_text = "  ".join(sample_texts(60) * 3)  # code indentation, tabs, CRLF, non-ASCII, "  "
    texts = ["before", long_text, "after"]
    chunk = Chunk("in.jsonl", 1, "".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    encoded = tokenize_corpus.encode_chunk(chunk, "text", None, True, np.dtype(np.uint16), None, 0, False)
    tokens, lengths = encoded.documents["train", ""]
    expected = [processor.encode(t) + [processor.eos_id()] for t in texts]
    assert lengths.tolist() == [len(ids) for ids in expected]
    assert tokens.tolist() == sum(expected, [])

    # Without spaces there is no safe cut: pieces end where they must, and the text survives.
    spaceless = "世界,naïve;" * 400
    tokens = model.encode_long(spaceless, np.dtype(np.uint16))
    assert len(tokens) > 1 and processor.decode(np.concatenate(tokens).tolist()[:-1]) == spaceless


def peak_rss_mb(args: list[str], cwd: Path) -> float:
    """Peak resident set of the largest process of a CLI run (the parent or a worker)."""
    measure = (
        "import resource, subprocess, sys\n"
        "subprocess.run([sys.executable, '-m', 'data_prep', *sys.argv[1:]], check=True)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    result = subprocess.run([sys.executable, "-c", measure, *args], cwd=cwd, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1]) / 1024


def test_memory_of_a_huge_single_line_document_stays_bounded(tmp_path, tokenizer):
    """A 20 MB document used to take 850 MB (SentencePiece needs ~35 bytes per character it
    encodes at once); in pieces it takes ~3.5 bytes per character (copies of the line's text).
    The bound allows 10: far below the old figure, far above the new one."""
    rng = random.Random(7)
    paragraph = make_text(rng, 10_000)
    write_jsonl(tmp_path / "huge.jsonl", [{"text": " ".join([paragraph] * (20_000_000 // len(paragraph)))}])
    write_jsonl(tmp_path / "small.jsonl", [{"text": t} for t in sample_texts()])
    common = ["--tokenizer-model", tokenizer, "--workers", "1"]
    baseline = peak_rss_mb(["tokenize", "--input", "small.jsonl", "--output-prefix", "small", *common], tmp_path)
    huge = peak_rss_mb(["tokenize", "--input", "huge.jsonl", "--output-prefix", "huge", *common], tmp_path)
    assert huge < baseline + 10 * 20, f"{huge:.0f} MB for a 20 MB document (baseline {baseline:.0f} MB)"


def test_chunks_are_whole_lines_numbered_from_one_even_when_a_line_spans_many_reads(tmp_path):
    lines = [b"short", b"x" * 10_000, b"", b"last line without newline"]
    (tmp_path / "in.txt").write_bytes(b"\n".join(lines))
    chunks = [chunk for chunk, _ in read_chunks(str(tmp_path / "in.txt"), chunk_bytes=1000)]
    assert b"".join(chunk.data for chunk in chunks) == b"\n".join(lines)
    assert all(chunk.data.endswith(b"\n") for chunk in chunks[:-1])
    first_lines = [1]
    for chunk in chunks[:-1]:
        first_lines.append(first_lines[-1] + chunk.data.count(b"\n"))
    assert [chunk.first_line for chunk in chunks] == first_lines


def test_pool_returns_results_in_order_and_reads_at_most_a_window_ahead():
    """Bounded memory: the reader never runs more than `window` chunks ahead of the writer,
    even when later tasks finish first."""
    pulled = 0

    def tasks():
        nonlocal pulled
        for item in range(40):
            pulled += 1
            yield (0.02 * (item % 3 == 0), item), f"tag{item}"

    with OrderedPool(multiprocessing.get_context(), 3, _no_setup) as pool:
        results = []
        for result, tag in pool.imap(_sleep_then_return, tasks(), window=4):
            results.append((result, tag))
            assert pulled - len(results) < 4
    assert results == [(item, f"tag{item}") for item in range(40)]


def test_a_dead_worker_is_an_error_not_a_hang():
    with OrderedPool(multiprocessing.get_context(), 2, _no_setup) as pool:
        with pytest.raises(RuntimeError, match="worker process died"):
            list(pool.imap(os._exit, [((3,), None)], window=2))


def _no_setup() -> None:
    pass


def _sleep_then_return(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


# ---------------------------------------------------------------- bad input

BAD_LINES = [
    ("malformed_json", '{"text": "unterminated', "malformed JSON"),
    ("missing_key", '{"body": "no text key"}', "missing key 'text'"),
    ("not_a_string", '{"text": ["a", "list"]}', "is not a string (list)"),
    ("invalid_utf8", b'{"text": "bad \xff byte"}', "invalid UTF-8"),
    ("invalid_utf8", '{"text": "lone \\ud800 surrogate"}', "lone surrogate"),
    ("empty_document", '{"text": "  \\n "}', "empty document"),
]


def write_with_bad_line(path: Path, bad: str | bytes) -> list[str]:
    """Good documents on lines 1, 2 and 4, the bad line on line 3; returns the good texts."""
    good = ["first good document", "second good document", "third good document"]
    lines = [
        json.dumps({"text": good[0]}).encode(),
        json.dumps({"text": good[1]}).encode(),
        bad if isinstance(bad, bytes) else bad.encode(),
        json.dumps({"text": good[2]}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return good


@pytest.mark.parametrize("kind, line, reason", BAD_LINES)
def test_bad_line_fails_naming_file_line_and_reason_and_writes_nothing(tmp_path, tokenizer, kind, line, reason):
    write_with_bad_line(tmp_path / "in.jsonl", line)
    result = run_cli(
        "tokenize", "--input", "in.jsonl", "--output-prefix", "out", "--tokenizer-model", tokenizer, cwd=tmp_path
    )
    assert result.returncode == 1
    assert "in.jsonl:3:" in result.stderr and reason in result.stderr
    assert "--on-error skip" in result.stderr  # says what to change
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("kind, line, reason", BAD_LINES)
def test_bad_line_is_skipped_and_counted(tmp_path, tokenizer, processor, IndexedDataset, kind, line, reason):
    good = write_with_bad_line(tmp_path / "in.jsonl", line)
    result = run_cli(
        "tokenize",
        "--input",
        "in.jsonl",
        "--output-prefix",
        "out",
        "--on-error",
        "skip",
        "--tokenizer-model",
        tokenizer,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "skipped 1 line:" in result.stdout
    stats = json.loads((tmp_path / "out.stats.json").read_text())
    assert stats["skipped"] == {k: int(k == kind) for k in stats["skipped"]}
    assert stats["first_skipped"][kind].startswith("in.jsonl:3:")
    eos = processor.eos_id()
    assert documents(IndexedDataset(str(tmp_path / "out"))) == [processor.encode(t) + [eos] for t in good]


def test_every_kind_of_bad_line_is_counted_separately(tmp_path, tokenizer):
    lines = [json.dumps({"text": "fine"}).encode()]
    lines += [line if isinstance(line, bytes) else line.encode() for _, line, _ in BAD_LINES]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    result = run_cli(
        "tokenize",
        "--input",
        "in.jsonl",
        "--output-prefix",
        "out",
        "--on-error",
        "skip",
        "--tokenizer-model",
        tokenizer,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "skipped 6 lines: 1 malformed JSON, 2 invalid UTF-8, 1 missing key, 1 non-string value, 1 empty document"
    ) in result.stdout
    stats = json.loads((tmp_path / "out.stats.json").read_text())
    assert stats["skipped"] == {
        "malformed_json": 1,
        "invalid_utf8": 2,
        "missing_key": 1,
        "not_a_string": 1,
        "empty_document": 1,
    }
    assert stats["documents"] == 1 and stats["lines"] == 7


def test_only_bad_lines_is_an_error_not_an_empty_dataset(tmp_path, tokenizer):
    (tmp_path / "in.jsonl").write_text('{"text": ""}\nnot json\n')
    result = run_cli(
        "tokenize",
        "--input",
        "in.jsonl",
        "--output-prefix",
        "out",
        "--on-error",
        "skip",
        "--tokenizer-model",
        tokenizer,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "no documents" in result.stderr and "skipped 2 lines" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def truncated(name: str, lines: list[bytes]) -> bytes:
    """`lines` compressed as `name` says, cut in the middle of the (last) compressed stream."""
    if name.endswith(".gz"):
        data = gzip.compress(b"".join(lines))
        return data[: len(data) // 2]
    compress = zstandard.ZstdCompressor().compress
    if name.startswith("frames"):  # a whole frame, then half of the next one
        last = compress(b"".join(lines[100:]))
        return compress(b"".join(lines[:100])) + last[: len(last) // 2]
    data = compress(b"".join(lines))
    return data[: len(data) // 2]


@pytest.mark.parametrize("on_error", ["fail", "skip"])
@pytest.mark.parametrize("name", ["in.jsonl.zst", "frames.jsonl.zst", "in.jsonl.gz"])
def test_truncated_compressed_input_fails_naming_the_file_and_writes_nothing(tmp_path, tokenizer, name, on_error):
    """Not a bad line to skip: the rest of the file is missing. (zstd's stream reader ends
    silently where the bytes end, and the run would succeed on part of the file.)"""
    lines = [json.dumps({"text": text}).encode() + b"\n" for text in sample_texts(400)]
    (tmp_path / name).write_bytes(truncated(name, lines))
    result = run_cli(
        "tokenize",
        "--input",
        name,
        "--output-prefix",
        "out",
        "--on-error",
        on_error,
        "--tokenizer-model",
        tokenizer,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert f"{name}: compressed stream ends early (truncated file?); download it again" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_an_input_that_vanished_is_one_error_line_naming_it_and_nothing_written(tmp_path, tokenizer):
    """A file listed but gone when read (a dangling link, as a shard moved on a shared filesystem)."""
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in/a.jsonl", [{"text": text} for text in sample_texts(20)])
    (tmp_path / "in/b.jsonl").symlink_to(tmp_path / "moved.jsonl")
    result = run_cli(
        "tokenize", "--input", "in", "--output-prefix", "out", "--tokenizer-model", tokenizer, cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "data_prep: error: in/b.jsonl: No such file or directory; nothing written"
    ], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# ---------------------------------------------------------------- domains


def test_domain_split_writes_one_dataset_per_domain_and_a_blend_file(tmp_path, tokenizer, processor, IndexedDataset):
    rng = random.Random(3)
    records = [
        {"text": make_text(rng, rng.randint(3, 60)), "meta": {"redpajama_set_name": domain}}
        for domain in rng.choices(["RedPajamaC4", "RedPajamaGithub", "Red Pajama/Books"], k=60)
    ]
    write_jsonl(tmp_path / "a.jsonl.zst", records[:30], opener=zstandard.open)
    write_jsonl(tmp_path / "b.jsonl.gz", records[30:], opener=gzip.open)
    result = run_cli(
        "tokenize",
        "--input",
        "a.jsonl.zst",
        "b.jsonl.gz",
        "--output-prefix",
        "data/train",
        "--tokenizer-model",
        tokenizer,
        "--domain-key",
        "meta.redpajama_set_name",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr

    blend = json.loads((tmp_path / "data/train.blend.json").read_text())
    assert blend["tokenizer_model"] == tokenizer
    assert set(blend["domains"]) == {"RedPajamaC4", "RedPajamaGithub", "Red Pajama/Books"}
    assert blend["domains"]["Red Pajama/Books"]["prefix"] == "train_Red_Pajama_Books"
    assert not (tmp_path / "data/train.bin").exists()
    eos = processor.eos_id()
    total = sum(entry["tokens"] for entry in blend["domains"].values())
    for domain, entry in blend["domains"].items():
        dataset = IndexedDataset(str(tmp_path / "data" / entry["prefix"]))  # relative to the blend file
        expected = [processor.encode(r["text"]) + [eos] for r in records if r["meta"]["redpajama_set_name"] == domain]
        assert documents(dataset) == expected  # input order kept within a domain
        assert entry["documents"] == len(expected)
        assert entry["tokens"] == sum(map(len, expected))
        assert entry["weight"] == pytest.approx(entry["tokens"] / total)
    assert sum(entry["weight"] for entry in blend["domains"].values()) == pytest.approx(1.0)


def test_domain_names_that_sanitise_alike_get_distinct_files(tmp_path, tokenizer):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "one", "d": "a b"}, {"text": "two", "d": "a_b"}])
    result = run_cli(
        "tokenize",
        "--input",
        "in.jsonl",
        "--output-prefix",
        "p",
        "--domain-key",
        "d",
        "--tokenizer-model",
        tokenizer,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    blend = json.loads((tmp_path / "p.blend.json").read_text())
    prefixes = {domain: entry["prefix"] for domain, entry in blend["domains"].items()}
    assert prefixes["a b"] == "p_a_b" and prefixes["a_b"].startswith("p_a_b-")
    assert all((tmp_path / f"{prefix}.idx").exists() for prefix in prefixes.values())


# ---------------------------------------------------------------- interruption and reruns


def big_input(path: Path, megabytes: int) -> None:
    rng = random.Random(4)
    paragraph = make_text(rng, 1000)
    count = megabytes * 1_000_000 // len(paragraph)
    path.write_text("".join(json.dumps({"text": f"{i} {paragraph}"}) + "\n" for i in range(count)))


@contextlib.contextmanager
def run_in_progress(tmp_path: Path, tokenizer: str) -> Iterator[tuple[subprocess.Popen, list[int]]]:
    """A run on big.jsonl with 2 workers, given (process, workers' pids) once its first tokens
    are on disk (in the part of big.jsonl being written); killed on the way out if still running."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "data_prep",
            "tokenize",
            "--input",
            "big.jsonl",
            "--output-prefix",
            "out",
            "--tokenizer-model",
            tokenizer,
            "--workers",
            "2",
        ],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A suite started in the background (`make test &`) ignores SIGINT, and so would the run.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 0 for p in (tmp_path / "out.incomplete").glob("parts/*.writing/0.bin")):
            assert process.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        workers = children(process.pid)
        assert process.poll() is None and len(workers) == 2
        yield process, workers
    finally:
        process.kill()
        process.wait()


def stop(pid: int) -> None:
    """SIGSTOP, and wait until the process is stopped."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while state(pid) != "T":
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.002)


def children(pid: int) -> list[int]:
    return [
        int(stat.split()[0])
        for stat in map(_read_stat, Path("/proc").glob("[0-9]*/stat"))
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid
    ]


def running(pid: int) -> bool:
    return state(pid) not in ("", "Z")  # zombies have exited


def state(pid: int) -> str:
    """R, S, T (stopped), Z (zombie), ..., or "" once gone."""
    stat = _read_stat(Path(f"/proc/{pid}/stat"))
    return stat.rsplit(")", 1)[1].split()[0] if stat else ""


def _read_stat(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def file_tree(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in directory.rglob("*")
        if p.is_file()
    }


def assert_no_dataset(tmp_path: Path, IndexedDataset) -> None:
    for name in ("out.bin", "out.idx", "out.stats.json"):
        assert not (tmp_path / name).exists()
    with pytest.raises(AssertionError):
        IndexedDataset(str(tmp_path / "out"))


# Megatron's IndexedDataset.__del__ complains about the reader it could not build.
ignore_half_built_reader = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@ignore_half_built_reader
def test_killed_run_leaves_no_dataset_and_its_lock_does_not_block_the_rerun(tmp_path, tokenizer, IndexedDataset):
    """The workers inherited the lock file; they are kept stopped until the rerun is done, so
    the rerun proves that the lock went with the killed parent, not with its last worker."""
    big_input(tmp_path / "big.jsonl", 6)
    with run_in_progress(tmp_path, tokenizer) as (process, workers):
        for pid in workers:
            stop(pid)
        process.kill()
        process.wait(timeout=30)
    try:
        assert process.returncode == -signal.SIGKILL
        assert_no_dataset(tmp_path, IndexedDataset)
        assert (tmp_path / "out.lock").exists()  # left behind, but nobody holds it
        rerun = run_cli(
            "tokenize", "--input", "big.jsonl", "--output-prefix", "out", "--tokenizer-model", tokenizer, cwd=tmp_path
        )
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 10  # orphaned workers notice and exit
    while any(map(running, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in workers if running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "workers outlived their killed parent"

    assert rerun.returncode == 0, rerun.stderr
    lines = (tmp_path / "big.jsonl").read_text().count("\n")
    assert len(IndexedDataset(str(tmp_path / "out"))) == lines
    assert not (tmp_path / "out.incomplete").exists() and not (tmp_path / "out.lock").exists()


@ignore_half_built_reader
def test_ctrl_c_stops_cleanly_and_removes_partial_output(tmp_path, tokenizer, IndexedDataset):
    big_input(tmp_path / "big.jsonl", 6)
    with run_in_progress(tmp_path, tokenizer) as (process, workers):
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    assert process.returncode == 130
    assert "interrupted" in process.stderr.read()
    assert_no_dataset(tmp_path, IndexedDataset)
    assert not (tmp_path / "out.incomplete").exists() and not (tmp_path / "out.lock").exists()
    assert not any(map(running, workers))


def test_second_run_on_the_same_prefix_refuses_naming_the_first_and_touches_nothing(
    tmp_path, tokenizer, IndexedDataset
):
    """The first run is stopped mid-way (SIGSTOP): it keeps its lock and its files stay put, so
    any file the second run wrote or removed would show. Even --force must not get through."""
    big_input(tmp_path / "big.jsonl", 6)
    with run_in_progress(tmp_path, tokenizer) as (first, _):
        stop(first.pid)
        try:
            before = file_tree(tmp_path)
            second = run_cli(
                "tokenize",
                "--input",
                "big.jsonl",
                "--output-prefix",
                "out",
                "--force",
                "--tokenizer-model",
                tokenizer,
                cwd=tmp_path,
            )
            assert file_tree(tmp_path) == before
        finally:
            os.kill(first.pid, signal.SIGCONT)
        first.wait(timeout=120)
    assert second.returncode == 1
    assert (
        f"another data_prep run is writing out (pid {first.pid} on host {socket.gethostname()}, started "
    ) in second.stderr
    assert "choose another --output-prefix" in second.stderr
    assert first.returncode == 0, first.stderr.read()
    lines = (tmp_path / "big.jsonl").read_text().count("\n")
    assert len(IndexedDataset(str(tmp_path / "out"))) == lines
    assert not (tmp_path / "out.lock").exists()


def test_train_tokenizer_refuses_a_locked_prefix_and_a_killed_holder_does_not_block(tmp_path):
    """The holder is a real process that takes the lock with data_prep's own function."""
    rng = random.Random(6)
    write_jsonl(tmp_path / "in.jsonl", [{"text": make_text(rng, 50)} for _ in range(300)])
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom data_prep.lock import output_lock\n"
            "with output_lock('tok'):\n    print('locked', flush=True)\n    time.sleep(600)",
        ],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        try:
            assert holder.stdout.readline() == "locked\n"
            args = ["train-tokenizer", "--input", "in.jsonl", "--vocab-size", "300", "--output-prefix", "tok"]
            refused = run_cli(*args, cwd=tmp_path)
            assert refused.returncode == 1
            assert f"another data_prep run is writing tok (pid {holder.pid} on host " in refused.stderr
            assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "tok.lock"]
        finally:
            holder.kill()
    assert (tmp_path / "tok.lock").exists()
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "tok.model", "tok.vocab"]


def test_rerun_skips_finished_outputs_and_force_rebuilds(tmp_path, tokenizer):
    write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in sample_texts(10)])
    args = ["tokenize", "--input", "in.jsonl", "--output-prefix", "out", "--tokenizer-model", tokenizer]
    assert run_cli(*args, cwd=tmp_path).returncode == 0
    outputs = [tmp_path / name for name in ("out.bin", "out.idx", "out.stats.json")]
    before = [(p.stat().st_mtime_ns, p.read_bytes()) for p in outputs]

    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in outputs] == before

    forced = run_cli(*args, "--force", cwd=tmp_path)
    assert forced.returncode == 0 and "up to date" not in forced.stdout
    assert [p.stat().st_mtime_ns for p in outputs] != [mtime for mtime, _ in before]
    assert [p.read_bytes() for p in outputs[:2]] == [content for _, content in before[:2]]

    # Other settings: the old outputs are never silently replaced.
    changed = run_cli(*args, "--on-error", "skip", cwd=tmp_path)
    assert changed.returncode == 1 and "changed: on_error" in changed.stderr and "--force" in changed.stderr
    assert [p.read_bytes() for p in outputs[:2]] == [content for _, content in before[:2]]
    assert run_cli(*args, "--on-error", "skip", "--force", cwd=tmp_path).returncode == 0


def test_outputs_of_unknown_origin_are_not_overwritten(tmp_path, tokenizer):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "some text"}])
    (tmp_path / "out.bin").write_bytes(b"precious")
    result = run_cli(
        "tokenize", "--input", "in.jsonl", "--output-prefix", "out", "--tokenizer-model", tokenizer, cwd=tmp_path
    )
    assert result.returncode == 1 and "--force" in result.stderr
    assert (tmp_path / "out.bin").read_bytes() == b"precious"


# ---------------------------------------------------------------- dataset checks


def write_dataset(prefix: str, docs: list[np.ndarray]) -> None:
    writer = indexed.IndexedDatasetWriter(prefix, np.uint16)
    if docs:
        writer.append(np.concatenate(docs), np.array([len(doc) for doc in docs]))
    writer.finish()


DOCS = [np.arange(1, n + 1) for n in (5, 1, 17, 3)]


def test_verify_dataset_accepts_a_complete_dataset_and_inspect_refuses_a_truncated_one(tmp_path):
    write_dataset(str(tmp_path / "d"), DOCS)
    indexed.verify_dataset(str(tmp_path / "d"))
    assert run_cli("inspect", "d", cwd=tmp_path).returncode == 0

    os.truncate(tmp_path / "d.bin", 2 * sum(map(len, DOCS)) - 2)  # the last token missing
    result = run_cli("inspect", "d", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("data_prep: error: d.bin is 50 bytes, but d.idx says its 4 documents")


def _cut(path: str, count: int) -> None:
    os.truncate(path, os.path.getsize(path) - count)


def _overwrite(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


DAMAGE = [
    ("bin short by 3 bytes", DOCS, lambda p: _cut(p + ".bin", 3), ".bin", "truncated or damaged"),
    (
        "bin too long",
        DOCS,
        lambda p: _overwrite(p + ".bin", os.path.getsize(p + ".bin"), b"\0\0"),
        ".bin",
        "truncated or damaged",
    ),
    ("bin empty", DOCS, lambda p: os.truncate(p + ".bin", 0), ".bin", "is empty"),
    ("only empty documents", [np.arange(0)], lambda p: None, ".bin", "is empty"),
    ("bin missing", DOCS, lambda p: os.remove(p + ".bin"), ".bin", "No such file"),
    ("idx short by 8 bytes", DOCS, lambda p: _cut(p + ".idx", 8), ".idx", "truncated or damaged"),
    (
        "idx garbage",
        DOCS,
        lambda p: Path(p + ".idx").write_bytes(random.Random(7).randbytes(300)),
        ".idx",
        "is not a Megatron indexed dataset index",
    ),
    ("idx version 2", DOCS, lambda p: _overwrite(p + ".idx", 9, b"\x02"), ".idx", "index version 2"),
    ("idx dtype code 9", DOCS, lambda p: _overwrite(p + ".idx", 17, b"\x09"), ".idx", "dtype code 9"),
    ("idx empty", DOCS, lambda p: os.truncate(p + ".idx", 0), ".idx", "is not a Megatron indexed dataset index"),
    ("no documents", [], lambda p: None, ".idx", "holds no documents"),
]


@pytest.mark.parametrize("damage, docs, break_it, file, message", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_verify_dataset_refuses_a_damaged_dataset_naming_the_file(tmp_path, damage, docs, break_it, file, message):
    prefix = str(tmp_path / "d")
    write_dataset(prefix, docs)
    break_it(prefix)
    with pytest.raises(DataPrepError) as error:
        indexed.verify_dataset(prefix)
    assert prefix + file in str(error.value) and message in str(error.value)
    assert "rerun the `python -m data_prep tokenize` command that wrote it, with --force" in str(error.value)


# ---------------------------------------------------------------- inspect, tokenizer, CLI


def test_inspect_reports_counts_percentiles_domains_and_a_decoded_sample(tmp_path, tokenizer, processor):
    records = [{"text": f"doc {i} " + "model " * i, "src": "web" if i % 3 else "code"} for i in range(1, 31)]
    write_jsonl(tmp_path / "in.jsonl", records)
    assert (
        run_cli(
            "tokenize",
            "--input",
            "in.jsonl",
            "--output-prefix",
            "p",
            "--domain-key",
            "src",
            "--tokenizer-model",
            tokenizer,
            cwd=tmp_path,
        ).returncode
        == 0
    )
    stats = json.loads((tmp_path / "p.stats.json").read_text())

    result = run_cli("inspect", "p", "--samples", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = result.stdout
    assert "documents   30" in report
    assert f"tokens      {stats['tokens']:,} (uint16" in report
    lengths = [len(processor.encode(r["text"])) + 1 for r in records]
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99]).round().astype(int)
    assert f"min {min(lengths)} · p50 {p50} · p90 {p90} · p99 {p99} · max {max(lengths)} tokens" in report
    assert "ends in EOS 30 of 30 documents" in report
    domain_rows = [
        line.split() for line in report.splitlines() if line.startswith((" " * 12 + "web", " " * 12 + "code"))
    ]
    assert sorted(domain_rows) == sorted(
        [d["domain"], f"{d['documents']:,}", f"{d['tokens']:,}", f"{d['tokens'] / stats['tokens']:.1%}"]
        for d in stats["datasets"]
    )
    samples = [line for line in report.splitlines() if line.startswith("    │ ")]
    assert samples and all(line[6:].startswith("doc ") for line in samples)


def test_trained_tokenizer_is_deterministic_and_falls_back_to_bytes(tmp_path):
    rng = random.Random(5)
    write_jsonl(tmp_path / "in.jsonl", [{"text": make_text(rng, 50)} for _ in range(300)])
    models = []
    for _ in range(2):
        result = run_cli(
            "train-tokenizer",
            "--input",
            ".",
            "--vocab-size",
            "350",
            "--output-prefix",
            "a",
            "--sample-docs",
            "200",
            "--seed",
            "7",
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "a.vocab").exists() and not (tmp_path / "a.incomplete.model").exists()
        models.append((tmp_path / "a.model").read_bytes())
    assert models[0] == models[1]

    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "a.model"))
    assert processor.vocab_size() == 350
    unseen = "Ω字🙂"
    assert processor.decode(processor.encode(unseen)) == unseen
    assert "<0xE5>" in processor.encode(unseen, out_type=str)  # UTF-8 bytes of 字


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "missing.jsonl"], "does not exist"),
        (["--input", "in.jsonl", "--tokenizer-model", "nope.model"], "train-tokenizer"),
        (["--input", "in.txt", "--domain-key", "meta.source"], "--domain-key reads a JSON field"),
        (["--input", "in.parquet"], "must end in one of"),
        (["--input", "*.csv"], "matches no input files"),
    ],
)
def test_usage_errors_say_what_to_change(tmp_path, tokenizer, args, message):
    (tmp_path / "in.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "in.txt").write_text("x\n")
    (tmp_path / "in.parquet").write_text("x")
    if "--tokenizer-model" not in args:
        args = [*args, "--tokenizer-model", tokenizer]
    result = run_cli("tokenize", *args, "--output-prefix", "out", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("data_prep: error:") and message in result.stderr


@pytest.mark.parametrize("command", ["tokenize", "train-tokenizer"])
@pytest.mark.parametrize("prefix", ["file/out", "file/sub/out"])
def test_an_unwritable_output_prefix_is_one_error_line_before_any_work(tmp_path, tokenizer, command, prefix):
    """A path through a regular file cannot be written even by root (whose writes a chmod
    would not stop), as a read-only file system cannot."""
    (tmp_path / "in.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "file").write_text("not a directory")
    args = ["--tokenizer-model", tokenizer] if command == "tokenize" else ["--vocab-size", "300"]
    result = run_cli(command, "--input", "in.jsonl", "--output-prefix", prefix, *args, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"data_prep: error: cannot write output prefix {prefix}: ")
    assert result.stderr.endswith("; choose a writable --output-prefix\n")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "in.jsonl"]


def test_help_teaches_with_examples(tmp_path):
    for command in ([], ["tokenize"], ["train-tokenizer"], ["inspect"]):
        result = run_cli(*command, "--help", cwd=tmp_path)
        assert result.returncode == 0
        assert "examples:" in result.stdout and "python -m data_prep" in result.stdout
    assert "--on-error skip" in run_cli("tokenize", "--help", cwd=tmp_path).stdout
