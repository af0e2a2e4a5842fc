"""Online domain mixing on the layout grid: every layout reads the single-process global
batches, and every rank moves the mixture exactly as one process does.

Each layout is a real gloo group reading the demo corpus through `build_train_dataset`
(data.mixing=odm) and `MicroBatchLoader`, with the real reweighted loss on stand-in token losses
(the tokens mod 5: integers, so every layout's sums are exact and the rewards bit-identical).
The earlier pipeline stage has no loss reports: its mixture must still follow the last's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import REPO
from helpers.multiprocess import run_distributed

LAYOUTS = {  # id: (tp, pp, dp, cp)
    "tp1-pp2-dp1": (1, 2, 1, 1),  # the fast one: a stage without loss reports mixes as the last does
    "tp1-pp1-dp2": pytest.param((1, 1, 2, 1), marks=pytest.mark.slow),
    "tp2-pp1-dp1": pytest.param((2, 1, 1, 1), marks=pytest.mark.slow),
    "tp1-pp1-dp1-cp2": pytest.param((1, 1, 1, 2), marks=pytest.mark.slow),
    "tp2-pp2-dp2": pytest.param((2, 2, 2, 1), marks=pytest.mark.slow),
}
STEPS, GLOBAL_BATCH, MICRO_BATCH = 3, 8, 2


def _config(demo_dir):
    from launch.config import load_config

    return load_config(
        REPO / "configs/demo_cpu.yaml",
        [
            f"data.blend={demo_dir / 'train.blend.json'}",
            f"data.valid_blend={demo_dir / 'valid.blend.json'}",
            f"data.tokenizer_model={demo_dir / 'tokenizer.model'}",
            "model.seq_length=64",
            f"train.steps={STEPS}",
            f"train.global_batch_size={GLOBAL_BATCH}",
            f"train.micro_batch_size={MICRO_BATCH}",
            "data.mixing=odm",
            "data.mixing_exploration=0.2",
        ],
    )


def _train_steps(dataset, cfg, steps, num_domains):
    """Each step as the trainer runs it: resolve, read, loss reports, update. Returns what this
    rank read (its micro-batches' tokens and domains) and the mixture after each step."""
    from megatron.core import parallel_state as ps

    from launch.data import MicroBatchLoader
    from megatron_patches.loss import ReweightedLoss
    from megatron_patches.reweighting import ReweightSchedule

    loss = ReweightedLoss(ReweightSchedule("linupper", 0.5), num_domains=num_domains)
    loader = MicroBatchLoader(dataset, cfg, cfg.train.steps)
    read, mixtures = [], []
    for step in steps:
        dataset.start_step(step)
        reports = []
        for batch in loader.micro_batches(step):
            read.append((batch["tokens"].clone(), batch["domains"].clone()))
            if ps.is_pipeline_last_stage():
                token_losses = (batch["tokens"] % 5).to(torch.float32)
                reports.append(loss(batch["loss_mask"], batch["domains"], token_losses)[2])
        dataset.observe(reports)
        dataset.end_step()
        mixtures.append(dataset.mixture)
    return read, mixtures


def _layout_worker(tp, pp, cp, demo_dir, cache_dir):
    from megatron.core import parallel_state as ps

    from launch.data import build_train_dataset
    from launch.sources import DataSources
    from megatron_patches.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(tp, pp, cp)
    cfg = _config(demo_dir)
    sources = DataSources.open(cfg)
    dataset = build_train_dataset(cfg, sources, cache_dir)
    read, mixtures = _train_steps(dataset, cfg, range(STEPS), len(sources.train.domains))
    out = dict(dp_rank=ps.get_data_parallel_rank(), dp=ps.get_data_parallel_world_size(), read=read, mixtures=mixtures)
    if tp * pp * cp * out["dp"] == 1:  # the reference also stops after one step and resumes from its state
        stopped = build_train_dataset(cfg, sources, cache_dir)
        first, _ = _train_steps(stopped, cfg, [0], len(sources.train.domains))
        state = json.loads(json.dumps(stopped.state_dict()))  # as trainer_state.json holds it
        resumed = build_train_dataset(cfg, sources, cache_dir)
        resumed.load_state_dict(state)
        rest, resumed_mixtures = _train_steps(resumed, cfg, range(1, STEPS), len(sources.train.domains))
        out["resumed"] = (first + rest, resumed_mixtures)
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(demo_dir, cache_dir):
    return run_distributed(_layout_worker, 1, 1, 1, 1, demo_dir, cache_dir)[0]


def test_the_mixture_moves_and_a_resumed_reader_continues_exactly(reference):
    first, last = np.array(reference["mixtures"][0]), np.array(reference["mixtures"][-1])
    assert not np.allclose(first, last)
    assert last.sum() == pytest.approx(1.0) and last.min() >= 0.2 / len(last)  # the uniform share
    read, mixtures = reference["resumed"]
    assert mixtures == reference["mixtures"][1:]
    for (tokens, domains), (expected_tokens, expected_domains) in zip(read, reference["read"], strict=True):
        assert torch.equal(tokens, expected_tokens) and torch.equal(domains, expected_domains)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_every_layout_reads_the_global_batches_and_mixes_as_one_process(layout, reference, demo_dir, cache_dir):
    tp, pp, dp, cp = layout
    results = run_distributed(_layout_worker, tp * pp * dp * cp, tp, pp, cp, demo_dir, cache_dir)
    micro_steps = GLOBAL_BATCH // MICRO_BATCH
    samples = [  # the reference's samples in global order
        (tokens[i], domains[i]) for tokens, domains in reference["read"] for i in range(MICRO_BATCH)
    ]
    for result in results:
        assert result["mixtures"] == reference["mixtures"]  # bit-identical, on every stage and rank
        assert len(result["read"]) == STEPS * micro_steps // dp
        for m, (tokens, domains) in enumerate(result["read"]):
            step, micro = divmod(m, micro_steps // dp)
            first = step * GLOBAL_BATCH + micro * dp * MICRO_BATCH + result["dp_rank"] * MICRO_BATCH
            expected = samples[first : first + MICRO_BATCH]
            assert domains.tolist() == [int(d) for _, d in expected]
            if cp == 1:  # context parallelism cuts the rows; the domains say which samples they are
                assert torch.equal(tokens, torch.stack([t for t, _ in expected]))
