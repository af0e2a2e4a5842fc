"""Documents kept apart (`data.reset_attention_mask`, `data.reset_position_ids`): a document's
loss does not depend on the document before it in the window, with or without CP, and the
mask costs no host sync."""

from __future__ import annotations

import pytest
import torch
from helpers.megatron_harness import SEQ, VOCAB
from helpers.multiprocess import run_distributed

pytestmark = pytest.mark.distributed

EOD = VOCAB - 1
SECOND = 20  # the second document's input positions, the same tokens in both samples
FIRST = (9, 5)  # the first document's length (its end-of-document token included) per sample


def two_samples() -> dict[str, torch.Tensor]:
    """Two windows: a different first document each, then the same second document."""
    g = torch.Generator().manual_seed(0)
    second = torch.randint(0, EOD, (SECOND + 1,), generator=g)
    rows = []
    for length in FIRST:
        first = torch.cat([torch.randint(0, EOD, (length - 1,), generator=g), torch.tensor([EOD])])
        rest = torch.randint(0, EOD, (SEQ + 1 - length - SECOND - 1,), generator=g)
        rows.append(torch.cat([first, second, rest]))
    stream = torch.stack(rows)
    return dict(tokens=stream[:, :-1], labels=stream[:, 1:])


def _worker(cp: int):
    from helpers.host_reads import HostReadRecorder, SyncingOpRecorder
    from helpers.megatron_harness import tiny_gpt
    from megatron.core import parallel_state as ps
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_patches.attention import cp_token_positions
    from megatron_patches.loss import document_units
    from megatron_patches.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(cp=cp, seed=7)  # the initial weights do not depend on the layout
    model = tiny_gpt()
    batch = two_samples()
    # Documents kept apart as the dataset and launch.data build them; plain: neither.
    batch["reset_position_ids"] = torch.stack(
        [_get_ltor_masks_and_position_ids(t, EOD, True, True, False, False)[2] for t in batch["tokens"]]
    )
    batch["document_ids"], _ = document_units(batch["tokens"], EOD, SEQ)
    batch["position_ids"] = torch.arange(SEQ).expand(2, SEQ)
    local = get_batch_on_this_cp_rank(batch)

    def forward(positions, documents):
        """The token losses, and the host reads and CUDA-syncing operators of the forward."""
        with torch.no_grad(), HostReadRecorder() as reads, SyncingOpRecorder() as ops:
            losses = model(local["tokens"], positions, documents, labels=local["labels"])
        return losses, reads.calls + ops.calls

    apart, host_reads = forward(local["reset_position_ids"], local["document_ids"])
    plain, plain_host_reads = forward(local["position_ids"], None)
    # The mask adds no host read or syncing operator to those of the model itself.
    assert host_reads == plain_host_reads
    positions = cp_token_positions(apart.shape[1], ps.get_context_parallel_rank(), cp, apart.device)
    destroy_parallel()
    return positions, apart, plain


def token_losses(cp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The [2, SEQ] token losses with the documents kept apart and plain, the CP ranks' chunks
    put back in order."""
    apart, plain = torch.empty(2, SEQ), torch.empty(2, SEQ)
    for positions, *losses in run_distributed(_worker, cp, cp):
        apart[:, positions], plain[:, positions] = losses
    return apart, plain


def second_document(losses: torch.Tensor) -> list[torch.Tensor]:
    return [row[start : start + SECOND] for row, start in zip(losses, FIRST)]


@pytest.fixture(scope="module")
def single_process():
    return token_losses(1)


def test_a_documents_loss_does_not_depend_on_the_document_before_it(single_process):
    apart, plain = single_process
    a, b = second_document(apart)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Without the mask and the position reset it does: the check can fail.
    a, b = second_document(plain)
    assert not torch.allclose(a, b, rtol=1e-3)


def test_documents_are_kept_apart_alike_under_context_parallelism(single_process):
    torch.testing.assert_close(token_losses(2)[0], single_process[0], rtol=1e-5, atol=1e-6)
