"""data_prep's train/validation split (--valid-fraction, --split-seed) and exact deduplication
(--dedup exact) through the real CLI and real files; the references are the hash rule and the
first occurrences computed here, and one unsharded (or fresh) run."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from helpers import REPO

from data_prep.indexed import open_indexed_dataset
from data_prep.tokenizer import train_tokenizer

WORDS = "the of and to in is was for on that with as by at from data model train token loss weight".split()
DOMAINS = ["web", "code", "books"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("tokenizer")
    rng = random.Random(0)
    with (directory / "corpus.jsonl").open("w") as out:
        for _ in range(500):
            out.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(40))}) + "\n")
    train_tokenizer([str(directory / "corpus.jsonl")], str(directory / "tok"), vocab_size=300)
    return str(directory / "tok.model")


def write_corpus(directory: Path, files: int = 6, documents: int = 150) -> list[tuple[str, str]]:
    """JSONL files of three domains, some texts repeated across and within files; returns the
    (domain, text) of every document in input order."""
    rng = random.Random(0)
    directory.mkdir(parents=True)
    repeated = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(10)]
    corpus = []
    for index in range(files):
        lines = []
        for _ in range(documents):
            text = rng.choice(repeated) if rng.random() < 0.1 else " ".join(rng.choice(WORDS) for _ in range(20))
            domain = rng.choice(DOMAINS)
            lines.append(json.dumps({"text": text, "meta": {"set": domain}}))
            corpus.append((domain, text))
        (directory / f"part-{index:02d}.jsonl").write_text("\n".join(lines) + "\n")
    return corpus


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=cwd, env=env, capture_output=True, text=True)


def tokenize(cwd: Path, tokenizer: str, prefix: str, *more: str) -> subprocess.CompletedProcess:
    args = ["tokenize", "--input", "corpus", "--tokenizer-model", tokenizer, "--output-prefix", prefix]
    result = run_cli(*args, "--domain-key", "meta.set", *more, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result


def outputs(directory: Path) -> dict[str, bytes]:
    """Every dataset, digest and blend file in `directory` (not the stats, which hold timings)."""
    return {
        path.name: path.read_bytes()
        for path in sorted(directory.iterdir())
        if path.suffix in (".bin", ".idx", ".hashes") or path.name.endswith(".blend.json")
    }


def is_valid(text: str, fraction: float, seed: int) -> bool:
    """The rule as documented, written out: blake2b-64 keyed by the seed, below F * 2**64."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def decoded(prefix: Path, processor: spm.SentencePieceProcessor) -> list[str]:
    dataset = open_indexed_dataset(str(prefix))
    return [processor.decode(dataset.document(i)[:-1].tolist()) for i in range(len(dataset))]


def test_the_split_is_by_document_hash_whatever_the_shards_and_workers(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "corpus")
    split = ["--valid-fraction", "0.2", "--split-seed", "7"]
    tokenize(tmp_path, tokenizer, "one/train", *split, "--workers", "1")
    tokenize(tmp_path, tokenizer, "two/train", *split, "--workers", "2")
    for index in range(4):
        tokenize(tmp_path, tokenizer, "four/train", *split, "--num-shards", "4", "--shard-index", str(index))
    merged = run_cli("merge", "--output-prefix", "four/train", cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    assert "four/valid.blend.json" in merged.stdout

    expected = outputs(tmp_path / "one")
    names = {
        f"{side}_{domain}{suffix}" for side in ("train", "valid") for domain in DOMAINS for suffix in (".bin", ".idx")
    }
    assert set(expected) == names | {"train.blend.json", "valid.blend.json"}
    assert outputs(tmp_path / "two") == expected
    assert outputs(tmp_path / "four") == expected

    # Each domain's documents, in input order, are those the rule puts on each side: by
    # document, disjoint, none lost; and identical texts always on the same side.
    processor = spm.SentencePieceProcessor(model_file=tokenizer)
    for domain in DOMAINS:
        texts = [text for name, text in corpus if name == domain]
        assert decoded(tmp_path / f"one/valid_{domain}", processor) == [t for t in texts if is_valid(t, 0.2, 7)]
        assert decoded(tmp_path / f"one/train_{domain}", processor) == [t for t in texts if not is_valid(t, 0.2, 7)]
    held_out = sum(is_valid(text, 0.2, 7) for _, text in corpus) / len(corpus)
    assert 0.15 < held_out < 0.25  # 900 documents, about 20 %

    stats = json.loads((tmp_path / "one/train.stats.json").read_text())
    counts = {(d["split"], d["domain"]): d["documents"] for d in stats["datasets"]}
    for domain in DOMAINS:
        texts = [text for name, text in corpus if name == domain]
        assert counts["valid", domain] == sum(is_valid(t, 0.2, 7) for t in texts)
        assert counts["train", domain] + counts["valid", domain] == len(texts)
    assert stats["run"]["valid_fraction"] == 0.2 and stats["run"]["split_seed"] == 7
    for key in ("run", "documents", "tokens", "datasets", "per_file"):
        assert json.loads((tmp_path / "four/train.stats.json").read_text())[key] == stats[key], key

    other_seed = run_cli(*tokenize_args(tokenizer, "one/train"), "--valid-fraction", "0.2", cwd=tmp_path)
    assert other_seed.returncode == 1
    assert "other settings (changed: split_seed)" in other_seed.stderr and "--force" in other_seed.stderr


def tokenize_args(tokenizer: str, prefix: str) -> list[str]:
    return [
        "tokenize",
        "--input",
        "corpus",
        "--tokenizer-model",
        tokenizer,
        "--output-prefix",
        prefix,
        "--domain-key",
        "meta.set",
    ]


def test_a_training_config_takes_the_written_blends_as_they_are(tmp_path, tokenizer):
    from launch.config import load_config, validate
    from launch.sources import DataSources, check_files
    from launch.tools.study.cli import parse_args

    write_corpus(tmp_path / "corpus")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    tokenize(tmp_path, "data/tokenizer.model", "data/train", "--valid-fraction", "0.1")

    # What `python -m launch.tools.study --data DIR` passes to every run.
    common = parse_args(["--data", str(tmp_path / "data")]).common
    cfg = load_config(REPO / "configs/demo_cpu.yaml", common)
    validate(cfg, 1)
    check_files(cfg)  # refuses missing, damaged or mismatched files
    sources = DataSources.open(cfg)
    assert sources.valid.domains == sources.train.domains == sorted(DOMAINS)
    assert all(Path(prefix).name.startswith("valid_") for prefix in sources.valid.prefixes)
    assert np.isclose(sum(sources.valid.weights), 1)


def test_split_refusals_say_what_to_change(tmp_path, tokenizer):
    write_corpus(tmp_path / "corpus", files=1, documents=20)
    refused = run_cli(*tokenize_args(tokenizer, "out"), "--valid-fraction", "0.1", cwd=tmp_path)
    assert refused.returncode == 1 and "must end in 'train' (e.g. train -> valid)" in refused.stderr
    tiny = run_cli(*tokenize_args(tokenizer, "train"), "--valid-fraction", "0.001", cwd=tmp_path)
    assert tiny.returncode == 1 and "with no valid documents; raise it" in tiny.stderr
    assert not (tmp_path / "train.stats.json").exists() and not (tmp_path / "valid.blend.json").exists()
    (tmp_path / "valid.bin").write_bytes(b"another run's")
    foreign = run_cli(*tokenize_args(tokenizer, "train"), "--valid-fraction", "0.3", cwd=tmp_path)
    assert foreign.returncode == 1 and "valid.bin exists but no train.stats.json" in foreign.stderr
    bad = run_cli(*tokenize_args(tokenizer, "train"), "--valid-fraction", "1.5", cwd=tmp_path)
    assert bad.returncode == 2 and "between 0 and 1" in bad.stderr
    assert all("Traceback" not in result.stderr for result in (refused, tiny, foreign, bad))


# ---------------------------------------------------------------- --dedup exact


def first_occurrences(corpus: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """The reference: the documents whose text did not come earlier, and the drops per domain."""
    seen, kept, dropped = set(), [], {}
    for domain, text in corpus:
        if text in seen:
            dropped[domain] = dropped.get(domain, 0) + 1
        else:
            seen.add(text)
            kept.append((domain, text))
    return kept, dict(sorted(dropped.items()))


def test_dedup_drops_exactly_the_repeats_across_files_and_across_shards_at_merge(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "corpus")
    kept, dropped = first_occurrences(corpus)
    assert sum(dropped.values()) > 50 and len(dropped) == 3  # repeats within and across files and domains
    one = tokenize(tmp_path, tokenizer, "one/train", "--dedup", "exact", "--workers", "2")
    assert f"dropped {sum(dropped.values()):,} documents whose text came earlier" in one.stdout
    for index in range(3):
        tokenize(
            tmp_path, tokenizer, "three/train", "--dedup", "exact", "--num-shards", "3", "--shard-index", str(index)
        )
    merged = run_cli("merge", "--output-prefix", "three/train", cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr

    processor = spm.SentencePieceProcessor(model_file=tokenizer)
    for domain in DOMAINS:
        assert decoded(tmp_path / f"one/train_{domain}", processor) == [t for d, t in kept if d == domain]
    stats = json.loads((tmp_path / "one/train.stats.json").read_text())
    assert stats["duplicates"] == dropped and stats["documents"] == len(kept)
    assert sum(sum(record["duplicates"].values()) for record in stats["per_file"]) == sum(dropped.values())

    expected = outputs(tmp_path / "one")
    assert len([name for name in expected if name.endswith(".hashes")]) == 3
    assert outputs(tmp_path / "three") == expected
    three = json.loads((tmp_path / "three/train.stats.json").read_text())
    for key in ("run", "documents", "tokens", "duplicates", "datasets", "per_file"):
        assert three[key] == stats[key], key
    shards = [json.loads((tmp_path / f"three/train.shards/{k}-of-3/train.stats.json").read_text()) for k in range(3)]
    assert sum(sum(shard["duplicates"].values()) for shard in shards) < sum(dropped.values())  # the merge drops more


def test_dedup_with_a_split_and_a_file_added_then_one_removed_equals_a_fresh_run(tmp_path, tokenizer):
    """The added file comes second: the files after it are deduplicated against it again."""
    corpus = write_corpus(tmp_path / "corpus", files=3)
    settings = ["--dedup", "exact", "--valid-fraction", "0.2"]
    tokenize(tmp_path, tokenizer, "out/train", *settings)
    repeats = [json.dumps({"text": text, "meta": {"set": "web"}}) for _, text in corpus[::7]]
    (tmp_path / "corpus/part-00a-first.jsonl").write_text("\n".join(repeats) + "\n")  # after part-00
    rerun = tokenize(tmp_path, tokenizer, "out/train", *settings)
    assert "kept             3 input files finished before; tokenized 1" in rerun.stdout
    assert_same_as_a_fresh_run(tmp_path, tokenizer, settings)

    # A file removed: the one after it lacks its repeats, so it is tokenized again; those before are kept.
    (tmp_path / "corpus/part-01.jsonl").unlink()
    rerun = tokenize(tmp_path, tokenizer, "out/train", *settings)
    assert "kept             2 input files finished before; tokenized 1" in rerun.stdout
    assert_same_as_a_fresh_run(tmp_path, tokenizer, settings)


def assert_same_as_a_fresh_run(tmp_path: Path, tokenizer: str, settings: list[str]) -> None:
    tokenize(tmp_path, tokenizer, "fresh/train", *settings, "--force")
    assert outputs(tmp_path / "out") == outputs(tmp_path / "fresh")
    out, fresh = (json.loads((tmp_path / f"{d}/train.stats.json").read_text()) for d in ("out", "fresh"))
    assert out["per_file"] == fresh["per_file"] and out["duplicates"] == fresh["duplicates"]


def test_dedup_drops_repeats_across_the_chunks_of_one_file(tmp_path, tokenizer):
    """A file of several 512 KiB chunks (read and encoded apart): repeats of earlier chunks go too."""
    corpus = write_corpus(tmp_path / "corpus", files=1, documents=12000)
    assert (tmp_path / "corpus/part-00.jsonl").stat().st_size > 2 * (1 << 19)
    kept, dropped = first_occurrences(corpus)
    run = tokenize(tmp_path, tokenizer, "train", "--dedup", "exact", "--workers", "2")
    assert f"dropped {sum(dropped.values()):,} documents" in run.stdout
    processor = spm.SentencePieceProcessor(model_file=tokenizer)
    for domain in DOMAINS:
        assert decoded(tmp_path / f"train_{domain}", processor) == [t for d, t in kept if d == domain]
    assert json.loads((tmp_path / "train.stats.json").read_text())["per_file"][0]["duplicates"] == dropped
