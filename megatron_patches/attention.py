"""Core attention on `torch.nn.functional.scaled_dot_product_attention`, with context parallelism.

A drop-in for Megatron-Core's `DotProductAttention` through the layer spec.  It needs no
CUDA memory buffer and no CUDA RNG tracker, so it runs on CPU, and on GPU SDPA picks a
flash or memory-efficient kernel.  Megatron-Core's local attention refuses context
parallelism (that normally comes from Transformer Engine); this one does it itself: each
rank holds two chunks of the sequence in the load-balanced order of
`megatron.core.utils.get_batch_on_this_cp_rank` (chunks r and 2·CP−1−r of 2·CP), gathers
keys and values from the whole CP group, and masks causally by true token positions.

Megatron's `reset_attention_mask` (documents kept apart inside a sample) comes in as the
`attention_mask` argument holding each position's document id ([b, s], in the CP split like
the tokens): a position then attends to earlier positions of its own document only.  The
mask is built per sample on the device from those ids, so nothing reads them on the host.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over a group; the backward sums gradients and keeps this rank's part.

    The backward uses all-reduce rather than reduce-scatter because gloo has no reduce-scatter.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        ctx.rank, ctx.size = dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(local) for _ in range(ctx.size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.size)[ctx.rank], None


def cp_token_positions(local_length: int, cp_rank: int, cp_size: int, device) -> torch.Tensor:
    """True sequence positions of a rank's tokens under the load-balanced two-chunk split."""
    chunk = local_length // 2
    offsets = torch.arange(chunk, device=device)
    return torch.cat([cp_rank * chunk + offsets, (2 * cp_size - 1 - cp_rank) * chunk + offsets])


class SDPAttention(MegatronModule):
    """Causal self-attention core: [s, b, heads, head_dim] in, [s, b, heads·head_dim] out."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPAttention supports causal self-attention only, got {attn_mask_type}")
        if config.window_size is not None or config.softmax_type != "vanilla":
            raise ValueError("SDPAttention supports neither sliding windows nor softmax offsets")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        if config.apply_query_key_layer_scaling:
            raise ValueError("apply_query_key_layer_scaling is an fp16 trick; SDPA needs no extra scaling")
        self.cp_group = (
            pg_collection.cp
            if pg_collection is not None and hasattr(pg_collection, "cp")
            else parallel_state.get_context_parallel_group()
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        cp_size = dist.get_world_size(self.cp_group) if self.cp_group is not None else 1
        documents = attention_mask  # each position's document id, or None
        mask, causal = None, True
        if cp_size > 1:
            cp_rank = dist.get_rank(self.cp_group)
            local_length = query.shape[0]
            key = _GatherSequence.apply(key, self.cp_group)
            value = _GatherSequence.apply(value, self.cp_group)
            q_pos = cp_token_positions(local_length, cp_rank, cp_size, query.device)
            k_pos = torch.cat([cp_token_positions(local_length, r, cp_size, query.device) for r in range(cp_size)])
            mask, causal = k_pos[None, :] <= q_pos[:, None], False
        if documents is not None:
            key_documents = documents
            if cp_size > 1:  # in the keys' order: every rank's chunks, rank by rank
                parts = [torch.empty_like(documents) for _ in range(cp_size)]
                dist.all_gather(parts, documents.contiguous(), group=self.cp_group)
                key_documents = torch.cat(parts, dim=1)
            if mask is None:  # the causal mask SDPA would have applied
                mask = torch.ones(query.shape[0], key.shape[0], dtype=torch.bool, device=query.device).tril()
            # [b, 1, s_q, s_k]: causal and within one document; a position always sees itself.
            mask, causal = mask & (documents[:, None, :, None] == key_documents[:, None, None, :]), False
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        # [b, h, s, d] -> [s, b, h·d]
        return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)
