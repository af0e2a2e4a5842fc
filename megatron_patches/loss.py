"""The reweighted loss function for Megatron-Core's `forward_backward_func`.

Megatron's schedules call `loss_func(output_tensor)` on the last pipeline stage of every
micro-batch and expect `(loss, num_tokens, report)`; unless `calculate_per_token_loss` is
set they divide `loss` by `num_tokens` and by the number of micro-batches, and Megatron's
DDP averages gradients over the data- and context-parallel ranks.  This module fits the
paper's objective into that contract:

* per-sample loss l_i = Σ_t m_it c_it / Σ_t m_it, both sums taken over the CP group;
* one all-gather of (l_i, valid_i, n_i, domain_i) over the data-parallel group (never the
  world), so every TP/PP/CP rank of every replica holds the same global micro-batch and
  computes bit-identical weights;
* each rank back-propagates DP·CP · Σ_{local i} w_i · (its CP share of l_i) and reports one
  token, so that after DDP's average over DP×CP the gradient is exactly ∇ Σ_{i∈B} w_i l_i
  over the global micro-batch B; Megatron's accumulation then averages micro-batches.

A sample is a *unit* of a row: by default the whole row (sequence).  With `units_per_row`
> 1 and a unit-id tensor, a row holds several units (e.g. the documents of a packed
sequence), each with its own loss and weight.  A unit slot that no token belongs to is
padding: it is no sample, so it is neither weighted nor counted as invalid (a unit whose
tokens are all masked out, or whose loss is NaN, is invalid).  `document_units` gives the
unit ids of documents; they are computed on whole rows, before the CP split.

Weights come from `reweighting.gather_and_weigh` with the token prior, so `uniform` is the
token-mean loss of the global micro-batch: Megatron's ordinary loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_patches.reweighting import ReweightSchedule, gather_and_weigh, weight_statistics


def document_units(tokens: torch.Tensor, eod: int, max_units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's document segment in its row ([rows, tokens]) and each row's number of
    segments ([rows]), from the input tokens of whole rows.

    A position belongs to the document its input token is part of, so an end-of-document
    token is its document's last position (as Megatron's `reset_attention_mask` has it).
    Segments past `max_units` share the last slot; the counts are taken before that bound.
    """
    ends = (tokens == eod).to(torch.int64)
    segments = torch.cumsum(ends, dim=1) - ends  # end-of-document tokens before each position
    return torch.clamp(segments, max=max_units - 1), segments[:, -1] + 1


class ReweightedLoss:
    """Callable as `partial(loss, loss_mask, domains)` → Megatron's `loss_func(output_tensor)`.

    `schedule` says which strategy and temperature apply at the current optimizer step;
    the training loop advances it.  `num_domains` > 0 adds per-domain weight shares to the
    report.  `units_per_row`: the unit slots of every row (the same on every rank, so the
    all-gather has one shape); more than one needs `unit_ids` at call time.  Groups default
    to Megatron's parallel state, read at call time.
    """

    def __init__(
        self,
        schedule: ReweightSchedule,
        *,
        delta: float = 1.0,
        num_domains: int = 0,
        units_per_row: int = 1,
        dp_group: dist.ProcessGroup | None = None,
        cp_group: dist.ProcessGroup | None = None,
    ):
        if units_per_row < 1:
            raise ValueError(f"units_per_row must be >= 1 (got {units_per_row})")
        self.schedule = schedule
        self.delta = delta
        self.num_domains = num_domains
        self.units_per_row = units_per_row
        self._dp_group = dp_group
        self._cp_group = cp_group

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self._dp_group or parallel_state.get_data_parallel_group(with_context_parallel=False)

    @property
    def cp_group(self) -> dist.ProcessGroup:
        return self._cp_group or parallel_state.get_context_parallel_group()

    def _per_unit(self, values: torch.Tensor, unit_ids: torch.Tensor | None) -> torch.Tensor:
        """Token values [rows, tokens] summed per unit slot: [rows · units_per_row], row-major."""
        if unit_ids is None:
            return values.sum(dim=1)
        # Tokens of no unit (id −1) go to an extra slot that is dropped.
        slots = torch.where(unit_ids < 0, self.units_per_row, unit_ids).to(torch.int64)
        sums = values.new_zeros(values.shape[0], self.units_per_row + 1).scatter_add(1, slots, values)
        return sums[:, : self.units_per_row].reshape(-1)

    def __call__(
        self,
        loss_mask: torch.Tensor,
        domains: torch.Tensor | None,
        token_losses: torch.Tensor,
        *,
        unit_ids: torch.Tensor | None = None,
        unit_counts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """`unit_ids` [rows, tokens]: each token's unit in its row, 0 … units_per_row − 1, or
        −1 for none; default one unit per row.  `unit_counts` [rows]: each row's units before
        the bound of units_per_row, for the report (`units_per_sample`, `units_over_bound`).
        `domains`: one id per row, or per unit slot ([rows, units_per_row])."""
        if unit_ids is None and self.units_per_row > 1:
            raise ValueError(f"units_per_row={self.units_per_row} needs unit_ids: which unit each token belongs to")
        mask = loss_mask.to(token_losses.dtype)
        local_sums = self._per_unit(token_losses * mask, unit_ids)  # this CP rank's share, with grad
        local_counts = self._per_unit(mask, unit_ids)
        columns = [local_sums.detach(), local_counts]
        if unit_ids is not None:  # the tokens of each unit slot, masked or not: 0 is padding
            columns.append(self._per_unit(torch.ones_like(mask), unit_ids))

        # Whole-unit sums: add the CP ranks' shares (detached: weights are constants).
        totals = torch.stack(columns)
        if dist.get_world_size(self.cp_group) > 1:
            dist.all_reduce(totals, group=self.cp_group)
        sums, counts = totals[0], totals[1]
        padding = None if unit_ids is None else totals[2] == 0
        losses = sums / torch.clamp(counts, min=1)
        valid = (counts > 0) & torch.isfinite(losses)

        rows = token_losses.shape[0]
        if domains is None:
            domains = torch.zeros_like(losses)
        else:  # a row's domain is that of each of its units
            domains = domains.reshape(rows, -1).expand(rows, self.units_per_row).reshape(-1)
        extra = [domains]
        if padding is not None:
            extra.append(padding)
        if unit_counts is not None:  # a row's count on each of its unit slots
            extra.append(unit_counts.reshape(rows, 1).expand(rows, self.units_per_row).reshape(-1))
        strategy, temperature = self.schedule.current()
        batch = gather_and_weigh(
            losses,
            strategy=strategy,
            temperature=temperature,
            delta=self.delta,
            valid=valid,
            token_counts=counts,
            extra=torch.stack([column.to(torch.float64) for column in extra], dim=1),
            group=self.dp_group,
        )
        batch_padding = None if padding is None else batch.extra[:, 1] > 0
        safe_losses = torch.where(batch.valid, batch.losses, 0.0)
        valid_counts = torch.where(batch.valid, batch.token_counts, 0.0)
        report = weight_statistics(
            batch.weights, batch.losses, batch.valid, batch.extra[:, 0], self.num_domains, batch_padding
        )
        report.update(
            lm_loss=(safe_losses * valid_counts).sum() / torch.clamp(valid_counts.sum(), min=1),
            weighted_loss=(batch.weights * safe_losses).sum(),
            weights=batch.weights,
            sample_losses=batch.losses,
            token_counts=batch.token_counts,
        )
        if unit_counts is not None:
            row_counts = batch.extra[:, -1].reshape(-1, self.units_per_row)[:, 0]
            report.update(
                units_per_sample=row_counts.mean(),
                units_over_bound=(row_counts > self.units_per_row).to(torch.float64).mean(),
            )

        # Each CP rank holds part of every unit's tokens: its share is local_sum / total count.
        shares = torch.where(valid, local_sums / torch.clamp(counts, min=1), 0.0)
        local_weights = batch.local(batch.weights, losses.shape[0], self.dp_group).to(shares.dtype)
        replicas = dist.get_world_size(self.dp_group) * dist.get_world_size(self.cp_group)
        loss = replicas * (local_weights * shares).sum()
        return loss, torch.ones((), dtype=torch.int, device=loss.device), report
