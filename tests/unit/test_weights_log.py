"""The weights log: each sample's documents from Megatron's indices, and its rows' weights."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.multiprocess import run_distributed

from launch.config import ConfigError, experiment_changes, load_config, to_dict, validate
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
        "configs/demo_cpu.yaml",
        [
            f"data.blend={demo_dir / 'train.blend.json'}",
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


def test_the_interval_must_be_positive_and_weights_per_sequence():
    for overrides, expected in [
        (["logging.weights_every=0"], "logging.weights_every=0 must be >= 1"),
        (["logging.weights_every=2", "reweight.unit=document"], "logs one weight per sequence"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            validate(load_config("configs/demo_cpu.yaml", overrides), 1)


def test_turning_the_log_on_at_a_resume_is_the_same_experiment():
    saved = to_dict(load_config("configs/demo_cpu.yaml"))
    assert (
        experiment_changes(saved, load_config("configs/demo_cpu.yaml", ["logging.weights_every=4"]), saved_dp=1, dp=1)
        == []
    )


def test_the_report_refuses_a_run_without_a_weights_log_and_runs_beside_it(tmp_path, capsys):
    from launch.tools.report import main

    assert main(["--weights", str(tmp_path)]) == 2
    assert "train with --set logging.weights_every=N" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["--weights", str(tmp_path), str(tmp_path)])
    assert refused.value.code == 2
    assert "or --weights RUN" in capsys.readouterr().err
