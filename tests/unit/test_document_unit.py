"""`reweight.unit: document` in one process: the segments of a row, the settings, their refusals."""

from __future__ import annotations

import argparse

import pytest
import torch
from helpers import REPO

from launch.config import ConfigError, experiment_changes, load_config, to_dict, validate
from launch.dry_run import describe_run
from launch.metrics import StepStatistics
from megatron_patches.loss import document_units
from megatron_patches.megatron_lm import add_reweight_args, refusals

EOD = 2


def demo(*overrides: str):
    return load_config(REPO / "configs/demo_cpu.yaml", overrides)


def test_a_segment_ends_with_its_end_of_document_token_and_the_tail_shares_the_last_slot():
    tokens = torch.tensor(
        [
            [5, 2, 6, 7, 2, 8, 9, 9],  # three documents, the first and last cut by the window
            [5, 6, 7, 8, 9, 9, 9, 2],  # one, ending with the window
            [2, 2, 5, 2, 6, 2, 7, 8],  # five, past the bound of three
        ]
    )
    ids, counts = document_units(tokens, EOD, max_units=3)
    assert ids.tolist() == [[0, 0, 1, 1, 1, 2, 2, 2], [0] * 8, [0, 1, 2, 2, 2, 2, 2, 2]]
    assert counts.tolist() == [3, 1, 5]


def test_the_default_unit_is_the_sequence():
    rw = demo().reweight
    assert (rw.unit, rw.units_per_row) == ("sequence", 1)
    assert demo("reweight.unit=document", "reweight.max_segments_per_sample=4").reweight.units_per_row == 4


def test_impossible_document_settings_are_refused_with_what_to_change():
    with pytest.raises(ConfigError, match="'paragraph' is not one of 'sequence', 'document'"):
        demo("reweight.unit=paragraph")
    with pytest.raises(ConfigError) as error:
        validate(demo("reweight.unit=document", "reweight.max_segments_per_sample=0"), 2)
    assert "reweight.max_segments_per_sample=0 must be >= 1" in str(error.value)


def test_the_unit_is_part_of_the_experiment():
    saved = to_dict(demo())
    changes = experiment_changes(
        saved, demo("reweight.unit=document", "reweight.max_segments_per_sample=4"), saved_dp=1, dp=1
    )
    assert changes == [
        "reweight.unit: 'sequence' -> 'document'",
        "reweight.max_segments_per_sample: 16 -> 4",
    ]


def test_the_megatron_lm_drop_in_refuses_the_document_unit_naming_the_flag():
    args = add_reweight_args(argparse.ArgumentParser()).parse_args(["--reweight-unit", "document"])
    args.train_iters, args.hybrid_context_parallel, args.sft, args.use_legacy_models = 100, False, False, False
    assert any(problem.startswith("--reweight-unit document needs each token's document") for problem in refusals(args))


def test_document_rows_join_the_step_statistics_only_for_the_document_unit():
    sequence, documents = StepStatistics([]), StepStatistics([], documents=True)
    assert documents.rows[len(sequence.rows) :] == (
        ("segments_per_sample", "units_per_sample"),
        ("segments_over_bound", "units_over_bound"),
    )
    # A sequence run's open interval cannot become a document run's.
    with pytest.raises(ValueError, match="no row 'segments_per_sample'"):
        documents._flat(sequence._by_name([0.0] * len(sequence.rows)))


def test_documents_kept_apart_are_refused_where_they_cannot_be_honoured():
    with pytest.raises(ConfigError) as error:
        validate(
            demo(
                "data.reset_attention_mask=true",
                "model.transformer_impl=transformer_engine",
                "data.reset_position_ids=true",
                "model.position_embedding=rope",
            ),
            2,
        )
    assert "data.reset_attention_mask=true needs the local layer's SDPA attention" in str(error.value)
    assert "data.reset_position_ids=true has no effect with model.position_embedding=rope" in str(error.value)
    validate(demo("data.reset_attention_mask=true", "data.reset_position_ids=true", "data.eod_mask_loss=true"), 2)


def test_the_dry_run_names_the_unit_and_the_documents_kept_apart():
    lines = describe_run(demo("reweight.unit=document", "data.reset_attention_mask=true"), 2)
    assert any("linupper, temperature 0.5, delta 1.0, per document (at most 16 a sample)" in line for line in lines)
    assert "documents kept apart: data.reset_attention_mask" in lines
