"""The weights log on a real demo dataset (one gloo rank): each sample's documents are those Megatron reads
it from, and its rows carry the loss report's gathered weights."""

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
    from megatron_patches.loss import ReweightedLoss
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
        domain, sample, documents = sample_documents(dataset, index)
        _, read = dataset.datasets[domain]._query_document_sample_shuffle_indices(sample)
        readings.append((domain, int(dataset[index]["dataset_id"]), documents, read.tolist()))

    loss = ReweightedLoss(ReweightSchedule("linupper", 0.5), num_domains=len(sources.train.domains))
    token_losses = torch.rand(4, 8, generator=torch.Generator().manual_seed(0))
    _, _, report = loss(torch.ones(4, 8), torch.tensor([0, 1, 1, 0]), token_losses)
    rows = weight_rows(dataset, 16, 2, sources.train.domains, report)
    write_weights(run_dir, 2, rows)
    samples = [int(dataset.dataset_sample_index[i]) for i in range(16, 20)]
    return readings, rows, report["weights"].tolist(), report["sample_losses"].tolist(), samples, sources.train.domains


@pytest.fixture(scope="module")
def one_rank(demo_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    (result,) = run_distributed(_one_rank, 1, demo_dir, tmp_path_factory.mktemp("cache"), run_dir)
    return run_dir, *result


def test_documents_are_those_megatron_reads_the_sample_from(one_rank):
    _, readings, *_ = one_rank
    assert any(len(documents) > 1 for _, _, documents, _ in readings)  # samples across documents too
    for domain, dataset_id, documents, read in readings:
        assert domain == dataset_id and documents == read


def test_rows_carry_the_loss_reports_gathered_weights_in_order(one_rank):
    run_dir, _, rows, weights, losses, samples, domains = one_rank
    read = read_weights(run_dir)
    assert read == json.loads(json.dumps(rows))
    assert [r["weight"] for r in read] == weights
    assert [r["loss"] for r in read] == losses
    assert [r["dataset_sample"] for r in read] == samples
    assert all(r["domain"] in domains and r["step"] == 2 for r in read)
