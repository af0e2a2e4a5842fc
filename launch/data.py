"""Training and validation data through Megatron-Core's datasets.

The training mixture is a `BlendedDataset` of one `GPTDataset` per domain (Megatron's
deterministic shuffling and blending), and each sample carries the id of its domain so
the loss can report per-domain weight shares.  Samples are read in Megatron's pretraining
order: global batch k holds dataset indices [k·G, (k+1)·G) whatever the data-parallel
size (with `data.mixing: odm` the same indices of a `MixedDataset`, resolved when the step
starts), each micro-step takes the next DP·micro_batch_size of them, and each DP rank its
contiguous slice.  The data position is therefore just the step number.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.utils import get_batch_on_this_cp_rank

from launch.config import Config
from launch.mixing import Exp3Mixer, MixedDataset
from launch.sources import Blend, DataSources, Tokenizer
from megatron_patches.loss import document_units


def _dataset_config(cfg: Config, tokenizer: Tokenizer, cache_dir: Path, **blend) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length,
        path_to_cache=str(cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=cfg.data.reset_position_ids,
        reset_attention_mask=cfg.data.reset_attention_mask,
        eod_mask_loss=cfg.data.eod_mask_loss,
        create_attention_mask=False,  # the attention builds it from `document_ids`
        **blend,
    )


def _build(config: GPTDatasetConfig, sizes: list[int | None]):
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


def _split(cfg: Config) -> str:
    """Held-out files leave all of the training files to training; else carve data.split."""
    return "100,0,0" if cfg.data.valid_blend else cfg.data.split


def build_train_dataset(cfg: Config, sources: DataSources, cache_dir: Path):
    """The training set, large enough for every step of the run: Megatron's blend of fixed
    weights, or with `data.mixing: odm` a `MixedDataset` whose mixture moves (launch.mixing)."""
    blend, samples = sources.train, cfg.train.steps * cfg.train.global_batch_size
    if cfg.data.mixing == "fixed":
        config = _dataset_config(
            cfg, sources.tokenizer, cache_dir, blend=(blend.prefixes, blend.weights), split=_split(cfg)
        )
        train, _, _ = _build(config, [samples, 0, 0])
        return train
    # Any domain may be drawn for every sample of the run: each is built that long.
    datasets = [
        _build(
            _dataset_config(cfg, sources.tokenizer, cache_dir, blend=([prefix], None), split=_split(cfg)),
            [samples, 0, 0],
        )[0]
        for prefix in blend.prefixes
    ]
    d = cfg.data
    return MixedDataset(
        datasets,
        Exp3Mixer(blend.weights, exploration=d.mixing_exploration, smoothing=d.mixing_smoothing),
        seed=cfg.train.seed,
        global_batch_size=cfg.train.global_batch_size,
        steps=cfg.train.steps,
        update_interval=d.mixing_update_interval,
    )


def order_fixed_in_advance(dataset) -> bool:
    """Whether every step's samples are known before the run (a blend), so that reading may run
    ahead of the step; a `MixedDataset` knows a step's only when it starts."""
    return getattr(dataset, "order_fixed_in_advance", True)


def build_validation_datasets(
    cfg: Config, sources: DataSources, blend: Blend, cache_dir: Path
) -> dict[str, GPTDataset]:
    """One held-out dataset per domain with eval_iters global batches of samples: from the
    held-out blend when there is one, else each domain's `data.split` validation share."""
    size = cfg.train.eval_iters * cfg.train.global_batch_size
    split = _split(cfg)
    position = 0 if cfg.data.valid_blend else 1
    datasets = {}
    for domain, prefix in zip(blend.domains, blend.prefixes):
        sizes = [0, 0, 0]
        sizes[position] = size
        built = _build(_dataset_config(cfg, sources.tokenizer, cache_dir, blend=([prefix], None), split=split), sizes)
        if built[position] is not None:
            datasets[domain] = built[position]
    return datasets


def micro_batches(dataset, cfg: Config, step: int, num_steps: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches for `num_steps` global batches starting at `step`.

    A sample's domain is its `dataset_id` in the blend, i.e. its index in `Blend.domains`
    (0 for a single dataset).  With `reweight.unit: document` each position's document slot
    (`unit_ids`) is found on the whole row, before the context-parallel split cuts it, and
    `unit_counts` holds each row's number of documents.  With `data.reset_attention_mask` each
    position's document (`document_ids`, unbounded) goes to the attention, found likewise.
    """
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mbs, gbs = cfg.train.micro_batch_size, cfg.train.global_batch_size
    for index in range(step * gbs, (step + num_steps) * gbs, dp * mbs):
        first = index + dp_rank * mbs
        samples = [dataset[i % len(dataset)] for i in range(first, first + mbs)]
        batch = {
            key: torch.stack([torch.as_tensor(s[key]) for s in samples])
            for key in ("tokens", "labels", "loss_mask", "position_ids")
        }
        per_sample = {"domains": torch.tensor([int(s.get("dataset_id", 0)) for s in samples])}
        eod = dataset.config.tokenizer.eod
        if cfg.data.reset_attention_mask:
            batch["document_ids"], _ = document_units(batch["tokens"], eod, cfg.model.seq_length)
        if cfg.reweight.unit == "document":
            ids, counts = document_units(batch["tokens"], eod, cfg.reweight.units_per_row)
            batch["unit_ids"], per_sample["unit_counts"] = ids, counts
        yield get_batch_on_this_cp_rank(batch) | per_sample
