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

import atexit
import signal
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
from launch.stopping import STOP_SIGNALS
from megatron_patches.device import on_gpu
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


def order_fixed_in_advance(dataset) -> bool:
    """Whether sample i is the same whenever it is read, so it may be read steps ahead: Megatron's
    datasets fix their order when built; one whose samples depend on the training so far says
    `order_fixed_in_advance = False`."""
    return getattr(dataset, "order_fixed_in_advance", True)


def micro_batch_indices(cfg: Config, step: int, num_steps: int) -> Iterator[list[int]]:
    """This rank's dataset indices, one list per micro-batch, for `num_steps` global batches
    starting at `step`: the sample order (module docstring), decided on the training thread."""
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mbs, gbs = cfg.train.micro_batch_size, cfg.train.global_batch_size
    for index in range(step * gbs, (step + num_steps) * gbs, dp * mbs):
        first = index + dp_rank * mbs
        yield list(range(first, first + mbs))


class MicroBatchReader(torch.utils.data.Dataset):
    """One micro-batch from its dataset indices: what a worker process does.

    A sample's domain is its `dataset_id` in the blend, i.e. its index in `Blend.domains`
    (0 for a single dataset).  With `reweight.unit: document` each position's document slot
    (`unit_ids`) is found on the whole row, before the context-parallel split cuts it, and
    `unit_counts` holds each row's number of documents.  With `data.reset_attention_mask` each
    position's document (`document_ids`, unbounded) goes to the attention, found likewise.
    """

    def __init__(self, dataset, cfg: Config):
        self.dataset, self.cfg = dataset, cfg

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        cfg, dataset = self.cfg, self.dataset
        samples = [dataset[i % len(dataset)] for i in indices]
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
        # The context-parallel rank and size come from the process groups, which a forked
        # worker inherits with the rest of the training process.
        batch = get_batch_on_this_cp_rank(batch) | per_sample
        return batch if torch.utils.data.get_worker_info() is None else _in_one_storage(batch)


def _in_one_storage(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as views of one buffer: a worker hands each storage to the training process
    as a shared-memory file descriptor, one round trip each, so one per micro-batch is cheapest."""
    sizes = {key: -(-t.nbytes // 8) * 8 for key, t in batch.items()}  # 8-byte aligned for any dtype
    buffer = torch.empty(sum(sizes.values()), dtype=torch.uint8)
    views, offset = {}, 0
    for key, tensor in batch.items():
        view = buffer[offset : offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        views[key] = view.copy_(tensor)
        offset += sizes[key]
    return views


def _ignore_stop_signals(worker_id: int) -> None:
    """A stop signal goes to every process of a job (Slurm, `scancel --signal`): a worker reads on
    until the training process has finished its step and saved, and then closes the loader (or,
    if it dies, the worker sees that and exits)."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class MicroBatchLoader:
    """This rank's micro-batches of one dataset, step by step, read by `data.num_workers`
    worker processes (torch's DataLoader), each up to `data.prefetch` micro-batches ahead of
    the training thread, into pinned memory on a GPU (so the copy to it is asynchronous).

    The training thread decides which samples each micro-batch holds (`micro_batch_indices`);
    the workers read and collate them, and the DataLoader hands them back in that order, so a
    run reads the same micro-batches with any number of workers.  The workers read ahead across
    steps, up to the dataset's last of `num_steps` global batches, when its order is fixed in
    advance; otherwise they start afresh for every step and see the dataset as that step finds it.
    """

    def __init__(self, dataset, cfg: Config, num_steps: int):
        self.dataset, self.cfg, self.num_steps = dataset, cfg, num_steps
        workers = cfg.data.num_workers  # null: 2 on a GPU; none on a CPU, whose cores run the step
        self.num_workers = (2 if on_gpu() else 0) if workers is None else workers
        self.micro_batches_per_step = cfg.train.micro_batches_per_step(ps.get_data_parallel_world_size())
        self._stream: Iterator | None = None
        self._next_step = self._end_step = 0  # the steps [next, end) that the open stream holds
        # Before multiprocessing's own exit handler, which would wait forever on workers that
        # ignore its SIGTERM; closing sends them the DataLoader's end of work instead.
        atexit.register(self.close)

    def micro_batches(self, step: int, num_steps: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """The micro-batches of `num_steps` global batches starting at `step`."""
        if self._stream is None or step != self._next_step or step + num_steps > self._end_step:
            end = self.num_steps if order_fixed_in_advance(self.dataset) else 0
            self._open(step, max(end, step + num_steps))
        self._next_step = step + num_steps
        last = num_steps * self.micro_batches_per_step - 1
        for i in range(last + 1):
            batch = next(self._stream)
            if i == last and self._next_step == self._end_step:
                self._stream = None  # the stream's last micro-batch: its workers exit now
            yield batch

    def _open(self, step: int, end: int) -> None:
        workers = self.num_workers
        loader = torch.utils.data.DataLoader(
            MicroBatchReader(self.dataset, self.cfg),
            batch_size=None,  # the reader collates: one item is one micro-batch
            sampler=micro_batch_indices(self.cfg, step, end - step),  # lazily: a run's worth is long
            num_workers=workers,
            prefetch_factor=self.cfg.data.prefetch if workers else None,
            pin_memory=on_gpu(),
            # Fork: the workers inherit the datasets (memory-mapped files and index arrays) and
            # the process groups' ranks rather than having them pickled.
            multiprocessing_context="fork" if workers else None,
            # Its own generator: the DataLoader draws a seed for its workers, which must not
            # advance the global RNG the model's dropout and initialisation draw from.
            generator=torch.Generator(),
            worker_init_fn=_ignore_stop_signals,
        )
        # Held back while the workers are forked (a pending stop reaches this process after), so
        # none can reach a worker before it ignores them.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self._stream, self._end_step = iter(loader), end
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def close(self) -> None:
        """Stop the workers (a run that ends before its last step leaves them reading ahead)."""
        self._stream = None
