"""The loader: worker processes hand back exactly the micro-batches the training thread would
read itself, in Megatron's order, from any step on; a dataset whose samples change between
steps is read as each step finds it."""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch
from helpers import REPO

from launch.config import load_config
from launch.data import MicroBatchLoader, build_train_dataset
from launch.sources import DataSources

STEPS, GLOBAL_BATCH = 4, 8
KEYS = ("tokens", "labels", "loss_mask", "position_ids")


@pytest.fixture(scope="module")
def single_process():
    """A one-process world in this process; the variables it sets (RANK, WORLD_SIZE, ...) go
    with it, or later tests in the process would take themselves for torchrun's ranks."""
    from megatron_patches.parallel import destroy_parallel, initialize_parallel

    environment = dict(os.environ)
    initialize_parallel(1, 1, 1)
    yield
    destroy_parallel()
    os.environ.clear()
    os.environ.update(environment)


def demo_config(demo_dir, *overrides: str):
    return load_config(
        REPO / "configs/demo_cpu.yaml",
        [
            f"data.blend={demo_dir / 'train.blend.json'}",
            f"data.valid_blend={demo_dir / 'valid.blend.json'}",
            f"data.tokenizer_model={demo_dir / 'tokenizer.model'}",
            "model.seq_length=64",
            f"train.steps={STEPS}",
            f"train.global_batch_size={GLOBAL_BATCH}",
            "train.micro_batch_size=2",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def demo_train(demo_dir, tmp_path_factory, single_process):
    cfg = demo_config(demo_dir)
    return cfg, build_train_dataset(cfg, DataSources.open(cfg), tmp_path_factory.mktemp("cache"))


def with_workers(cfg, workers: int):
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=workers))


def read(loader: MicroBatchLoader, first: int, last: int) -> list[dict]:
    """Steps first..last-1, one step at a time as the training loop asks for them."""
    return [batch for step in range(first, last) for batch in loader.micro_batches(step)]


@pytest.mark.parametrize("workers", [0, 2])
def test_micro_batches_hold_megatrons_samples_in_order(demo_train, workers):
    """One process: global batch k is dataset samples [k·G, (k+1)·G), read straight from the blend."""
    cfg, dataset = demo_train
    batches = read(MicroBatchLoader(dataset, with_workers(cfg, workers), STEPS), 0, STEPS)
    samples = [dataset[i] for i in range(STEPS * GLOBAL_BATCH)]
    for key in KEYS:
        expected = torch.stack([torch.as_tensor(s[key]) for s in samples])
        assert torch.equal(torch.cat([b[key] for b in batches]), expected), key
    assert torch.cat([b["domains"] for b in batches]).tolist() == [int(s["dataset_id"]) for s in samples]


def test_a_resumed_or_repeated_read_starts_at_its_step(demo_train):
    """The data position is the step: a loader opened at step 2 (a resume), and a second read of
    steps 0-1 (the same validation batches every time), give what an unbroken read gives."""
    cfg, dataset = demo_train
    cfg = with_workers(cfg, 2)
    unbroken = read(MicroBatchLoader(dataset, cfg, STEPS), 0, STEPS)
    resumed = read(MicroBatchLoader(dataset, cfg, STEPS), 2, STEPS)
    again = MicroBatchLoader(dataset, cfg, 2)
    first, second = list(again.micro_batches(0, 2)), list(again.micro_batches(0, 2))
    half = len(unbroken) // 2
    for key in KEYS:
        assert torch.equal(torch.cat([b[key] for b in resumed]), torch.cat([b[key] for b in unbroken[half:]]))
        assert torch.equal(torch.cat([b[key] for b in first]), torch.cat([b[key] for b in unbroken[:half]]))
        assert torch.equal(torch.cat([b[key] for b in second]), torch.cat([b[key] for b in first]))


def test_opening_a_loader_leaves_the_global_rng_alone(demo_train):
    """The DataLoader draws its workers' seed; from the global generator it would shift every
    dropout mask after it, and a resumed run's masks from the unbroken run's."""
    cfg, dataset = demo_train
    before = torch.get_rng_state()
    read(MicroBatchLoader(dataset, with_workers(cfg, 2), STEPS), 0, 1)
    assert torch.equal(torch.get_rng_state(), before)


class _Versioned(torch.utils.data.Dataset):
    """Samples that depend on the training so far (as an online mixture's do): every token is
    the dataset's `version` when the sample is read, which the loop raises after each step."""

    order_fixed_in_advance = False
    config = SimpleNamespace(tokenizer=SimpleNamespace(eod=0))

    def __init__(self, seq_length: int):
        self.seq_length, self.version = seq_length, 0

    def __len__(self):
        return 1000

    def __getitem__(self, i):
        tokens = torch.full((self.seq_length,), self.version)
        return {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(self.seq_length),
                "position_ids": torch.arange(self.seq_length)}  # fmt: skip


def test_a_dataset_whose_order_is_not_fixed_is_read_as_each_step_finds_it(demo_dir, single_process):
    cfg = with_workers(demo_config(demo_dir), 2)
    dataset = _Versioned(cfg.model.seq_length)
    loader = MicroBatchLoader(dataset, cfg, STEPS)
    seen = []
    for step in range(STEPS):
        seen.append({int(b["tokens"].unique()) for b in loader.micro_batches(step)})
        dataset.version += 1  # e.g. the domain weights updated after the optimizer step
    assert seen == [{0}, {1}, {2}, {3}]
