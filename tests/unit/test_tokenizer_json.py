"""Hugging Face tokenizer.json tokenizers beside SentencePiece: data_prep tokenizes with one, and
training reads it (EOD, vocabulary size, decoding, the blend's tokenizer check)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
from helpers import REPO

from data_prep.bench import train_gpt2_style_tokenizer
from data_prep.indexed import open_indexed_dataset
from data_prep.tokenizer import HuggingFaceTokenizer
from launch.config import ConfigError, load_config
from launch.dry_run import dry_run_report
from launch.sources import Tokenizer, check_files

EOS = "<|endoftext|>"
SPELLED_EOS = f"a page that quotes {EOS} in its text"  # must stay text, not become EOS


@pytest.fixture(scope="module")
def gpt2_style(demo_dir, tmp_path_factory) -> Path:
    """A tiny byte-level BPE tokenizer.json (vocab 600) trained on demo documents, with a
    tokenizer_config.json naming <|endoftext|> as its EOS."""
    lines = (demo_dir / "train.jsonl").read_text().splitlines()[:300]
    texts = [json.loads(line)["text"] for line in lines]
    return Path(train_gpt2_style_tokenizer(texts, 600, str(tmp_path_factory.mktemp("gpt2_style"))))


def run_data_prep(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=cwd, env=env, capture_output=True, text=True)


def tokenize(tmp_path: Path, inputs: Path, tokenizer: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_data_prep(
        "tokenize",
        "--input",
        str(inputs),
        "--tokenizer-model",
        str(tokenizer),
        "--output-prefix",
        str(tmp_path / "out/train"),
        "--domain-key",
        "meta.redpajama_set_name",
        "--workers",
        "2",
        *extra,
        cwd=tmp_path,
    )


def corpus_with_spelled_eos(demo_dir: Path, tmp_path: Path) -> tuple[Path, list[dict]]:
    records = [json.loads(line) for line in (demo_dir / "valid.jsonl").read_text().splitlines()]
    records.append({"text": SPELLED_EOS, "meta": {"redpajama_set_name": records[0]["meta"]["redpajama_set_name"]}})
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path, records


def reference(tokenizer: Path, text: str) -> list[int]:
    """The tokenizers library's own encoding, nothing added, then EOS."""
    hf = tokenizers.Tokenizer.from_file(str(tokenizer))
    hf.encode_special_tokens = True
    return hf.encode(text, add_special_tokens=False).ids + [hf.token_to_id(EOS)]


def test_tokens_equal_the_tokenizers_encoding_plus_eos(demo_dir, gpt2_style, tmp_path):
    inputs, records = corpus_with_spelled_eos(demo_dir, tmp_path)
    result = tokenize(tmp_path, inputs, gpt2_style)
    assert result.returncode == 0, result.stderr

    blend = json.loads((tmp_path / "out/train.blend.json").read_text())
    eos = tokenizers.Tokenizer.from_file(str(gpt2_style)).token_to_id(EOS)
    for domain, entry in blend["domains"].items():
        dataset = open_indexed_dataset(str(tmp_path / "out" / entry["prefix"]))
        texts = [r["text"] for r in records if r["meta"]["redpajama_set_name"] == domain]
        got = [dataset.document(i).tolist() for i in range(len(dataset))]
        assert got == [reference(gpt2_style, text) for text in texts]
        # EOS ends each document and nowhere else: "<|endoftext|>" in a text stays text
        assert all(ids.count(eos) == 1 for ids in got)

    stats = json.loads((tmp_path / "out/train.stats.json").read_text())
    assert (stats["eos_id"], stats["vocab_size"], stats["dtype"]) == (eos, 600, "uint16")
    training_side = Tokenizer.from_model(str(gpt2_style))
    assert blend["tokenizer_sha256"] == training_side.sha256
    assert (training_side.eod, training_side.vocab_size) == (eos, 600)
    assert training_side.decode(reference(gpt2_style, SPELLED_EOS)[:-1]) == SPELLED_EOS

    inspected = run_data_prep("inspect", str(tmp_path / "out/train"), cwd=tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    assert f"{len(records)} of {len(records)} documents (id {eos})" in inspected.stdout


def test_a_tokenizer_json_without_an_eos_is_refused_naming_both_ways(demo_dir, gpt2_style, tmp_path):
    bare = tmp_path / "bare" / "tokenizer.json"
    bare.parent.mkdir()
    shutil.copyfile(gpt2_style, bare)  # no tokenizer_config.json beside it
    result = tokenize(tmp_path, demo_dir / "valid.jsonl", bare)
    assert result.returncode == 1
    assert "names no EOS token" in result.stderr and "--eos-token" in result.stderr
    assert "tokenizer_config.json" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()

    unknown = tokenize(tmp_path, demo_dir / "valid.jsonl", bare, "--eos-token", "<|nope|>")
    assert unknown.returncode == 1 and "'<|nope|>' is not in the vocabulary" in unknown.stderr

    given = tokenize(tmp_path, demo_dir / "valid.jsonl", bare, "--eos-token", EOS)
    assert given.returncode == 0, given.stderr
    assert json.loads((tmp_path / "out/train.stats.json").read_text())["eos_token"] == EOS


def demo_config(*overrides: str):
    return load_config(REPO / "configs/demo_cpu.yaml", list(overrides))


def test_training_refuses_a_blend_made_with_another_tokenizer(demo_dir, gpt2_style, tmp_path):
    """The demo's blends were made with its SentencePiece model; a tokenizer.json (or the same
    tokenizer.json with another EOS) is refused before any process starts."""
    inputs = demo_dir / "valid.jsonl"
    assert tokenize(tmp_path, inputs, gpt2_style).returncode == 0
    hf_blend = tmp_path / "out/train.blend.json"

    sentencepiece_blend_hf_tokenizer = demo_config(
        f"data.blend={demo_dir / 'train.blend.json'}",
        f"data.valid_blend={demo_dir / 'valid.blend.json'}",
        f"data.tokenizer_model={gpt2_style}",
    )
    with pytest.raises(ConfigError, match=r"data.blend .* whose content differs from data.tokenizer_model"):
        check_files(sentencepiece_blend_hf_tokenizer)

    other_eos = demo_config(
        f"data.blend={hf_blend}",
        f"data.valid_blend={hf_blend}",
        f"data.tokenizer_model={gpt2_style}",
        f"data.eos_token={tokenizers.Tokenizer.from_file(str(gpt2_style)).id_to_token(100)}",
    )
    with pytest.raises(ConfigError, match=r"whose content differs .*a tokenizer.json's EOS"):
        check_files(other_eos)

    matching = demo_config(
        f"data.blend={hf_blend}", f"data.valid_blend={hf_blend}", f"data.tokenizer_model={gpt2_style}"
    )
    check_files(matching)

    bare = tmp_path / "bare" / "tokenizer.json"
    bare.parent.mkdir()
    shutil.copyfile(gpt2_style, bare)
    no_eos = demo_config(f"data.blend={hf_blend}", f"data.valid_blend={hf_blend}", f"data.tokenizer_model={bare}")
    with pytest.raises(ConfigError, match=r"data.tokenizer_model: .* names no EOS token .*data.eos_token"):
        check_files(no_eos)
    fixed_vocabulary = dataclasses.replace(no_eos, model=dataclasses.replace(no_eos.model, vocab_size=4096))
    assert "names no EOS token" in dry_run_report(fixed_vocabulary, 2)  # a problem listed, not a crash


def test_a_sentencepiece_models_hash_is_still_its_files_so_older_blends_match(demo_dir):
    model = demo_dir / "tokenizer.model"
    assert Tokenizer.from_model(str(model)).sha256 == hashlib.sha256(model.read_bytes()).hexdigest()


def test_the_export_writes_the_tokenizer_json_with_the_runs_eos(gpt2_style, tmp_path):
    """AutoTokenizer loads the exported files offline and encodes as data_prep did; the EOS the
    run was given (here by data.eos_token, the tokenizer having no config) is the exported one."""
    from transformers import AutoTokenizer

    from launch.tools.export import _copy_hugging_face_tokenizer

    bare = tmp_path / "bare" / "tokenizer.json"
    bare.parent.mkdir()
    shutil.copyfile(gpt2_style, bare)
    out = tmp_path / "export"
    out.mkdir()
    _copy_hugging_face_tokenizer(HuggingFaceTokenizer(str(bare), EOS), 64, out)

    exported = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert (out / "tokenizer.json").read_bytes() == gpt2_style.read_bytes()
    assert exported.eos_token == EOS and exported.model_max_length == 64
    ids = exported(SPELLED_EOS, add_special_tokens=False)["input_ids"]
    assert ids + [exported.eos_token_id] == reference(gpt2_style, SPELLED_EOS)
