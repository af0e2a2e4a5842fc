"""A run on data tokenized with a GPT-2-style byte-level BPE tokenizer.json, from data_prep to
the exported model's tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tokenizers
from helpers.e2e import pretrain, rows
from helpers.export import offline_env, run_module

from data_prep import cli as data_prep_cli
from data_prep.bench import train_gpt2_style_tokenizer

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def hf_data(demo_dir, tmp_path_factory):
    """A 600-token tokenizer.json trained on demo documents; every 8th training document and the
    held-out ones tokenized with it, split by domain."""
    out = tmp_path_factory.mktemp("hf_data")
    lines = (demo_dir / "train.jsonl").read_text().splitlines()[::8]
    (out / "train.jsonl").write_text("\n".join(lines) + "\n")
    tokenizer = train_gpt2_style_tokenizer([json.loads(line)["text"] for line in lines], 600, str(out / "tok"))
    for split, source in (("train", out / "train.jsonl"), ("valid", demo_dir / "valid.jsonl")):
        command = ["tokenize", "--input", str(source), "--tokenizer-model", tokenizer, "--output-prefix",
                   str(out / split), "--domain-key", "meta.redpajama_set_name", "--workers", "2"]  # fmt: skip
        assert data_prep_cli.main(command) == 0
    return out, tokenizer


@pytest.fixture(scope="module")
def hf_run(hf_data, tmp_path_factory):
    data, tokenizer = hf_data
    run_dir = tmp_path_factory.mktemp("hf_run")
    pretrain(
        run_dir,
        data,
        f"data.blend={data / 'train.blend.json'}",
        f"data.valid_blend={data / 'valid.blend.json'}",
        f"data.tokenizer_model={tokenizer}",
        "train.steps=4",
        nproc=1,
    )
    return run_dir


def test_a_run_trains_on_a_tokenizer_json(hf_run):
    train = rows(hf_run)
    assert [r["step"] for r in train] == [2, 4]
    assert all(math.isfinite(r["loss"]) for r in train)
    assert len(rows(hf_run, "valid")[-1]["valid_loss_per_domain"]) == 5  # the demo's domains
    # The model's vocabulary is the tokenizer's 600 tokens padded to a multiple of 128: a fresh
    # model's loss is near log(640) (the demo's SentencePiece vocabulary would give log(2048)).
    assert abs(train[0]["loss"] - math.log(640)) < 0.2


@pytest.mark.slow
def test_the_export_carries_the_runs_tokenizer_json(hf_run, hf_data):
    from transformers import AutoConfig, AutoTokenizer

    _, tokenizer = hf_data
    out = hf_run / "hf"
    result = run_module("launch.tools.export", "--run-dir", hf_run, "--out", out, env=offline_env(hf_run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "tokenizer.json").read_bytes() == Path(tokenizer).read_bytes()
    exported = AutoTokenizer.from_pretrained(out, local_files_only=True)
    reference = tokenizers.Tokenizer.from_file(tokenizer)
    text = f"def f(x):\n    return x  # {EOS} stays text\n"
    reference.encode_special_tokens = True
    assert exported(text, add_special_tokens=False)["input_ids"] == reference.encode(text).ids
    eos = reference.token_to_id(EOS)
    assert exported.eos_token == EOS and AutoConfig.from_pretrained(out).eos_token_id == eos
    info = json.loads((out / "export_info.json").read_text())
    assert info["tokenizer_vocab_size"] == 600 and not (out / "sentencepiece.model").exists()
