"""The demo corpus: domains, validation split, redundancy, and the datasets built from it."""

import json
from collections import defaultdict
from pathlib import Path

import pytest
from helpers import REPO

from data_prep import demo as demo_data
from launch.config import load_config, validate
from launch.dry_run import dry_run_report
from launch.sources import check_files, read_blend

DOMAINS = {"code", "docs", "prose", "licenses", "boilerplate"}


def read_jsonl(path: Path) -> dict[str, list[str]]:
    by_domain = defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        by_domain[record["meta"]["redpajama_set_name"]].append(record["text"])
    return by_domain


def shingle_diversity(texts: list[str], n: int = 8) -> float:
    """Distinct word n-grams per n-gram: near 1 for varied text, near 0 for repeated text."""
    shingles, total = set(), 0
    for text in texts:
        words = text.split()
        for i in range(len(words) - n + 1):
            shingles.add(tuple(words[i : i + n]))
            total += 1
    return len(shingles) / total


def test_every_domain_is_present_in_both_splits(demo_dir):
    train, valid = read_jsonl(demo_dir / "train.jsonl"), read_jsonl(demo_dir / "valid.jsonl")
    assert set(train) == set(valid) == DOMAINS


def test_validation_holds_out_about_five_percent_of_each_domain_and_shares_no_document(demo_dir):
    train, valid = read_jsonl(demo_dir / "train.jsonl"), read_jsonl(demo_dir / "valid.jsonl")
    for domain in DOMAINS:
        assert not set(train[domain]) & set(valid[domain])
        assert 0.02 < len(valid[domain]) / (len(train[domain]) + len(valid[domain])) < 0.1


def test_the_corpus_is_a_few_megabytes_of_chunked_documents(demo_dir):
    size = (demo_dir / "train.jsonl").stat().st_size + (demo_dir / "valid.jsonl").stat().st_size
    assert 1_000_000 < size < 6_000_000
    texts = [t for texts in read_jsonl(demo_dir / "train.jsonl").values() for t in texts]
    assert max(map(len, texts)) <= demo_data.CHUNK_CHARS and all(t.strip() for t in texts)


def test_two_builds_write_identical_bytes(demo_dir, tmp_path):
    demo_data.write_corpus(tmp_path)
    for name in ("train.jsonl", "valid.jsonl"):
        assert (tmp_path / name).read_bytes() == (demo_dir / name).read_bytes()


def test_boilerplate_is_near_duplicate_and_the_other_domains_are_not(demo_dir):
    diversity = {d: shingle_diversity(t) for d, t in read_jsonl(demo_dir / "train.jsonl").items()}
    boilerplate = diversity.pop("boilerplate")
    assert boilerplate < 0.2
    assert all(boilerplate < other / 4 for other in diversity.values()), diversity


def test_chunks_cut_at_lines_and_keep_every_character():
    text = "short line\n" + "x" * 25 + "\nlast line"
    pieces = demo_data.chunk(text, max_chars=12)
    assert all(len(p) <= 12 for p in pieces)
    assert "".join(pieces).replace("\n", "") == text.replace("\n", "")


def test_blends_and_indexed_datasets_load(demo_dir):
    import sentencepiece
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(demo_dir / "tokenizer.model"))
    assert tokenizer.vocab_size() == demo_data.VOCAB_SIZE
    for split in ("train", "valid"):
        blend = read_blend(str(demo_dir / f"{split}.blend.json"))
        assert set(blend.domains) == DOMAINS and sum(blend.weights) == pytest.approx(1.0)
        for prefix in blend.prefixes:
            dataset = IndexedDataset(prefix)
            assert len(dataset) > 0
            assert int(dataset[0].max()) < demo_data.VOCAB_SIZE


def test_the_demo_config_is_ready_to_run_on_this_data(demo_dir):
    cfg = load_config(
        REPO / "configs/demo_cpu.yaml",
        [
            f"data.blend={demo_dir}/train.blend.json",
            f"data.valid_blend={demo_dir}/valid.blend.json",
            f"data.tokenizer_model={demo_dir}/tokenizer.model",
        ],
    )
    validate(cfg, world_size=2)
    check_files(cfg)
    report = dry_run_report(cfg, world_size=2)
    assert "vocab: 2048" in report and report.endswith("problems: none, ready to run")


def test_a_finished_build_is_left_alone(demo_dir, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in demo_dir.iterdir()}
    demo_data.build_demo_data(demo_dir)
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in demo_dir.iterdir()} == before


def test_the_web_variant_packs_both_kinds_into_one_domain_and_names_their_documents(tmp_path):
    demo_data.build_demo_data(tmp_path, "web")
    train, valid = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "valid.jsonl")
    pages = demo_data.web_pages()
    ranges = json.loads((tmp_path / "train.kinds.json").read_text())["web"]
    assert list(train) == ["web"] and sorted(valid) == ["web", "web-boilerplate", "web-informative"]
    for kind, (first, end) in ranges.items():
        assert set(train["web"][first:end]) <= set(pages[kind]) and set(valid[f"web-{kind}"]) <= set(pages[kind])
        assert not set(train["web"][first:end]) & set(valid["web"])
    assert ranges["boilerplate"][1] == len(train["web"])
    assert demo_data.read_blend_file(tmp_path / "train.blend.json").domains["web"].documents == len(train["web"])
    boilerplate, informative = (shingle_diversity(pages[kind]) for kind in ("boilerplate", "informative"))
    assert boilerplate < informative
