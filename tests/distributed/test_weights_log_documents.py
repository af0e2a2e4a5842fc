"""The weights log on a real demo dataset (one gloo rank): each sample's documents are those Megatron reads
it from, with the tokens each holds, and its rows carry the loss report's gathered weights, per sample
and per document segment."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO
from helpers.multiprocess import run_distributed

from launch.config import load_config
from launch.data import build_train_dataset
from launch.sources import DataSources
from launch.weights_log import read_weights, sample_documents, weight_rows, write_weights


def _one_rank(demo_dir, cache_dir, run_dir):
    """On one gloo rank (the datasets and the loss need a process group): the dataset's
    documents beside Megatron's own reading of them, and the rows of a real loss report."""
    from megatron_patches.loss import ReweightedLoss, document_units
    from megatron_patches.parallel import initialize_parallel
    from megatron_patches.reweighting import ReweightSchedule

    initialize_parallel(1, 1, 1)
    cfg = load_config(
        REPO / "configs/demo_cpu.yaml",
        [
            f"data.blend={demo_dir / 'train.blend.json'}",
            f"data.valid_blend={demo_dir / 'valid.blend.json'}",
            f"data.tokenizer_model={demo_dir / 'tokenizer.model'}",
            "model.seq_length=64",
            "train.steps=4",
            "train.global_batch_size=16",
        ],
    )
    sources = DataSources.open(cfg)
    dataset = build_train_dataset(cfg, sources, cache_dir)
    readings = []
    for index in range(len(dataset)):
        domain, sample, documents, tokens = sample_documents(dataset, index)
        _, read = dataset.datasets[domain]._query_document_sample_shuffle_indices(sample)
        inputs = dataset[index]["tokens"]
        readings.append((domain, int(dataset[index]["dataset_id"]), documents, read.tolist(), tokens, inputs))

    loss = ReweightedLoss(ReweightSchedule("linupper", 0.5), num_domains=len(sources.train.domains))
    token_losses = torch.rand(4, 8, generator=torch.Generator().manual_seed(0))
    _, _, report = loss(torch.ones(4, 8), torch.tensor([0, 1, 1, 0]), token_losses)
    rows = weight_rows(dataset, 16, 2, sources.train.domains, report)
    write_weights(run_dir, 2, rows)
    samples = [int(dataset.dataset_sample_index[i]) for i in range(16, 20)]

    # Per document segment: the real samples' own segments, at most 3 slots each.
    tokens = torch.stack([torch.as_tensor(dataset[i]["tokens"]) for i in range(16, 20)])
    unit_ids, unit_counts = document_units(tokens, sources.tokenizer.eod, 3)
    per_unit = ReweightedLoss(ReweightSchedule("linupper", 0.5), units_per_row=3)
    _, _, unit_report = per_unit(
        torch.ones_like(tokens), None, torch.rand(tokens.shape), unit_ids=unit_ids, unit_counts=unit_counts
    )
    segment_rows = weight_rows(dataset, 16, 2, sources.train.domains, unit_report, units_per_row=3)
    segments = [torch.bincount(row, minlength=3).tolist() for row in unit_ids]
    return (
        readings,
        rows,
        report["weights"].tolist(),
        report["sample_losses"].tolist(),
        samples,
        sources.train.domains,
        (segment_rows, unit_report["weights"].tolist(), segments, sources.tokenizer.eod),
    )


@pytest.fixture(scope="module")
def one_rank(demo_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    (result,) = run_distributed(_one_rank, 1, demo_dir, tmp_path_factory.mktemp("cache"), run_dir)
    return run_dir, *result


def test_documents_are_those_megatron_reads_the_sample_from(one_rank):
    _, readings, *_ = one_rank
    assert any(len(documents) > 1 for _, _, documents, *_ in readings)  # samples across documents too
    for domain, dataset_id, documents, read, *_ in readings:
        assert domain == dataset_id and documents == read


def test_each_documents_tokens_are_its_share_of_the_sample(one_rank):
    """Counted from Megatron's offsets, checked against the sample's own tokens: every
    document but the last ends with an end-of-document token, and the counts add up."""
    *_, (_, _, _, eod) = one_rank
    for *_, tokens, inputs in one_rank[1]:
        assert sum(tokens) == len(inputs) == 64 and all(n > 0 for n in tokens[:-1])
        ends = [int(i) for i in (torch.as_tensor(inputs) == eod).nonzero().flatten()]
        assert [sum(tokens[: k + 1]) - 1 for k in range(len(tokens) - 1)] == ends[: len(tokens) - 1]


def test_rows_carry_the_loss_reports_gathered_weights_in_order(one_rank):
    run_dir, _, rows, weights, losses, samples, domains, _ = one_rank
    read = read_weights(run_dir)
    assert read == json.loads(json.dumps(rows))
    assert [r["weight"] for r in read] == weights
    assert [r["loss"] for r in read] == losses
    assert [r["dataset_sample"] for r in read] == samples
    assert all(r["domain"] in domains and r["step"] == 2 for r in read)


def test_per_segment_rows_hold_each_segments_documents_tokens_and_weight(one_rank):
    """Row by row, sample by sample: slot j holds the sample's j-th document with input
    tokens (the last slot every one after), as many tokens as the loss counted in the slot."""
    _, readings, *_, (rows, weights, segments, _) = one_rank
    expected = []
    for offset, slots in enumerate(segments):
        _, _, documents, _, tokens, _ = readings[16 + offset]
        held = [(d, n) for d, n in zip(documents, tokens) if n > 0]
        for slot, count in enumerate(slots):
            if count:
                chosen = held[slot:] if slot == len(slots) - 1 else held[slot : slot + 1]
                expected.append((slot, [d for d, _ in chosen], [n for _, n in chosen], count))
    assert [(r["segment"], r["documents"], r["document_tokens"], sum(r["document_tokens"])) for r in rows] == expected
    assert [r["weight"] for r in rows] == [w for w in weights if w > 0]
