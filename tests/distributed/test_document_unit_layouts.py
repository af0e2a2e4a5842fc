"""`reweight.unit: document` under DP=2, TP=2, CP=2 and PP=2 equals a single-process reference.

Each sample of the global micro-batch holds document segments (one past the bound, one
fully masked, one crossing every CP chunk boundary); every layout must give the reference's
per-segment weights, reported losses and full gradients, the reference's segments being found
by a plain loop over the tokens and weighed in NumPy.  `launch.data.MicroBatchLoader` finds the
segments on whole rows, before the CP split.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.megatron_harness import GLOBAL_MICRO_BATCH, SEQ, VOCAB, global_batch, numpy_weights
from helpers.multiprocess import run_distributed

from megatron_patches.loss import document_units

pytestmark = pytest.mark.distributed

LAYOUTS = {  # id: (tp, pp, dp, cp)
    "dp2": (1, 1, 2, 1),
    "tp2": (2, 1, 1, 1),
    "cp2": (1, 1, 1, 2),
    "pp2": (1, 2, 1, 1),
}
STRATEGIES = ("uniform", "linupper")
TEMPERATURE = 0.5
RTOL = 5e-5  # as tests/distributed/test_layouts.py
EOD = VOCAB - 1
SLOTS = 3  # reweight.max_segments_per_sample
# Input positions of the end-of-document tokens per sample.  Under CP=2 the chunks end at 8, 16
# and 24.  Sample 0 has 4 segments (over the bound); sample 1's last segment is masked out
# (global_batch masks its second half) and sample 2 is masked out whole; sample 3's only
# document ends with the window.
ENDS = ([5, 12, 20], [10, 20], [15], [SEQ - 1])
SEGMENTS = [len(e) + (e[-1] < SEQ - 1) for e in ENDS]  # [4, 3, 2, 1]
BATCH_SEEDS = (0, 1)


def document_batch(seed: int) -> dict[str, torch.Tensor]:
    """The harness's ragged batch with its documents ending at ENDS, and their unit ids."""
    batch = global_batch(seed)
    stream = torch.cat([batch["tokens"], batch["labels"][:, -1:]], dim=1)
    stream[stream == EOD] = EOD - 1  # end-of-document tokens only where ENDS puts them
    for row, ends in enumerate(ENDS):
        stream[row, ends] = EOD
    batch["tokens"], batch["labels"] = stream[:, :-1], stream[:, 1:]
    batch["unit_ids"], batch["unit_counts"] = document_units(batch["tokens"], EOD, SLOTS)
    return batch


def loop_segment_losses(token_losses, tokens, mask):
    """(loss, loss-token count) of every segment slot, row-major, by walking each row's tokens."""
    losses, counts = [], []
    for row in range(tokens.shape[0]):
        sums, sizes, slot = [0.0] * SLOTS, [0.0] * SLOTS, 0
        for t in range(tokens.shape[1]):
            sums[slot] = sums[slot] + token_losses[row, t] * mask[row, t]
            sizes[slot] += float(mask[row, t])
            if tokens[row, t] == EOD:  # the end-of-document token closes its own segment
                slot = min(slot + 1, SLOTS - 1)
        losses += [s / max(n, 1.0) for s, n in zip(sums, sizes)]
        counts += sizes
    return losses, np.array(counts)


def _reference_worker():
    from helpers.megatron_harness import _named_local_parameters, tiny_gpt

    from megatron_patches.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(seed=7)
    model = tiny_gpt()
    full_state = {name: p.detach().clone() for name, p in _named_local_parameters(model)}
    params = dict(_named_local_parameters(model))
    results = {}
    for strategy in STRATEGIES:
        objective, per_batch = 0.0, []
        for seed in BATCH_SEEDS:
            batch = document_batch(seed)
            token_losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            mask = batch["loss_mask"]
            losses, counts = loop_segment_losses(token_losses, batch["tokens"], mask)
            values = np.array([float(loss) for loss in losses])
            weights = numpy_weights(values, counts, strategy, TEMPERATURE)
            loss = sum(float(w) * loss for w, loss, n in zip(weights, losses, counts) if n > 0)
            lm_loss = (token_losses * mask).sum() / mask.sum()
            per_batch.append(dict(weights=weights, weighted_loss=loss.item(), lm_loss=lm_loss.item()))
            objective = objective + loss / len(BATCH_SEEDS)  # Megatron averages the micro-batches
        grads = torch.autograd.grad(objective, list(params.values()))
        results[strategy] = dict(batches=per_batch, grads=dict(zip(params, grads)))
    destroy_parallel()
    return full_state, results


def _recorded(loss_fn, calls: list):
    """`loss_fn`, recording every host read and CUDA-syncing operator it makes into `calls`."""
    from helpers.host_reads import HostReadRecorder, SyncingOpRecorder

    def loss(*args, **kwargs):
        with HostReadRecorder() as reads, SyncingOpRecorder() as ops:
            result = loss_fn(*args, **kwargs)
        calls.extend(reads.calls + ops.calls)
        return result

    return loss


def _layout_worker(tp, pp, cp, full_state):
    from helpers.megatron_harness import layout_stepper
    from megatron.core import parallel_state as ps

    from megatron_patches.loss import ReweightedLoss
    from megatron_patches.parallel import destroy_parallel, initialize_parallel
    from megatron_patches.reweighting import ReweightSchedule

    initialize_parallel(tp, pp, cp, seed=123)  # a different seed: weights come from full_state
    step = layout_stepper(full_state)
    out = {"last_stage": ps.is_pipeline_last_stage(), "host_reads": []}
    for strategy in STRATEGIES:
        loss_fn = ReweightedLoss(ReweightSchedule(strategy, TEMPERATURE), num_domains=2, units_per_row=SLOTS)
        out[strategy] = step(_recorded(loss_fn, out["host_reads"]), [document_batch(s) for s in BATCH_SEEDS])
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_reference_worker, 1)[0]


_layout_cache: dict = {}


@pytest.fixture
def layout_run(request, reference):
    layout_id = request.param
    if layout_id not in _layout_cache:
        tp, pp, dp, cp = LAYOUTS[layout_id]
        _layout_cache[layout_id] = run_distributed(_layout_worker, tp * pp * dp * cp, tp, pp, cp, reference[0])
    return _layout_cache[layout_id]


def test_the_batch_has_the_segments_it_was_built_with():
    ids, counts = document_batch(0)["unit_ids"], document_batch(0)["unit_counts"]
    assert counts.tolist() == SEGMENTS
    assert ids[0, 13:].eq(SLOTS - 1).all()  # the third and fourth segments share the last slot


def test_uniform_over_segments_is_the_token_mean_loss(reference):
    for batch in reference[1]["uniform"]["batches"]:
        np.testing.assert_allclose(batch["weighted_loss"], batch["lm_loss"], rtol=1e-6)


@pytest.mark.parametrize("layout_run", list(LAYOUTS), indirect=True)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_layout_matches_single_process_reference(layout_run, reference, strategy):
    ref = reference[1][strategy]
    last_stage = [r for r in layout_run if r["last_stage"]]
    assert [r["host_reads"] for r in layout_run] == [[]] * len(layout_run)
    for result in last_stage:
        reports, _ = result[strategy]
        for report, expected in zip(reports, ref["batches"], strict=True):
            np.testing.assert_allclose(report["weights"].numpy(), expected["weights"], rtol=RTOL, atol=1e-12)
            np.testing.assert_allclose(report["weighted_loss"].item(), expected["weighted_loss"], rtol=RTOL)
            np.testing.assert_allclose(report["lm_loss"].item(), expected["lm_loss"], rtol=RTOL)
            # 12 slots: 3 padding (sample 2's last, sample 3's last two); of the 9 segments, 3 are
            # masked out (sample 1's last, both of sample 2's).
            assert report["padding_fraction"].item() == pytest.approx(3 / 12)
            assert report["invalid_fraction"].item() == pytest.approx(3 / 9)
            assert report["units_per_sample"].item() == np.mean(SEGMENTS)
            assert report["units_over_bound"].item() == 1 / GLOBAL_MICRO_BATCH
    # Bit-identical weights on every TP/CP/DP rank of the last stage.
    first = last_stage[0][strategy][0]
    for result in last_stage[1:]:
        for a, b in zip(first, result[strategy][0]):
            assert torch.equal(a["weights"], b["weights"])
    seen = set()
    for result in layout_run:
        for name, grad in result[strategy][1].items():
            expected = ref["grads"][name]
            scale = expected.abs().max()
            torch.testing.assert_close(grad, expected, rtol=RTOL, atol=RTOL * scale, msg=lambda m, n=name: f"{n}: {m}")
            seen.add(name)
    assert seen == set(ref["grads"])


class _Windows:
    """`document_batch(0)`'s samples as a dataset: what `launch.data.MicroBatchLoader` reads."""

    config = SimpleNamespace(tokenizer=SimpleNamespace(eod=EOD))

    def __init__(self):
        self.batch = document_batch(0)

    def __len__(self):
        return GLOBAL_MICRO_BATCH

    def __getitem__(self, i):
        keys = ("tokens", "labels", "loss_mask", "position_ids")
        return {key: self.batch[key][i] for key in keys} | {"dataset_id": i % 2}


def _micro_batches_worker():
    from megatron.core import parallel_state as ps

    from launch.config import Config, DataConfig, ModelConfig, TrainConfig
    from launch.data import MicroBatchLoader
    from megatron_patches.attention import cp_token_positions
    from megatron_patches.parallel import destroy_parallel, initialize_parallel
    from megatron_patches.reweighting import ReweightSettings

    initialize_parallel(cp=2)
    cfg = Config(
        model=ModelConfig(seq_length=SEQ),
        train=TrainConfig(global_batch_size=GLOBAL_MICRO_BATCH, micro_batch_size=GLOBAL_MICRO_BATCH // 2),
        data=DataConfig(reset_attention_mask=True, num_workers=2),  # the split in worker processes
        reweight=ReweightSettings(unit="document", max_segments_per_sample=SLOTS),
    )
    batches = list(MicroBatchLoader(_Windows(), cfg, num_steps=1).micro_batches(0))
    positions = cp_token_positions(SEQ // 2, ps.get_context_parallel_rank(), 2, "cpu")
    destroy_parallel()
    return positions, batches


def test_micro_batches_find_the_segments_on_whole_rows_before_the_cp_split():
    whole = document_batch(0)
    documents, _ = document_units(whole["tokens"], EOD, SEQ)
    half = GLOBAL_MICRO_BATCH // 2
    for positions, batches in run_distributed(_micro_batches_worker, 2):
        for i, batch in enumerate(batches):
            rows = slice(i * half, (i + 1) * half)
            assert torch.equal(batch["tokens"], whole["tokens"][rows][:, positions])
            assert torch.equal(batch["unit_ids"], whole["unit_ids"][rows][:, positions])
            assert torch.equal(batch["document_ids"], documents[rows][:, positions])
            assert batch["unit_counts"].tolist() == SEGMENTS[rows]
