"""Initial weights that do not depend on the parallel layout.

Megatron draws each rank's weights from that rank's random stream: on CPU every pipeline
stage draws from the same seeded stream (so stage 1's layers start as copies of stage 0's),
and on GPU every TP rank draws its own shard from its own generator.  `initialize_weights`
draws every parameter again, whole, from a generator keyed by the seed and the parameter's
global name, and keeps this rank's TP shard of it: one seed gives one model under any
TP/PP/DP layout, with Megatron's distributions.
"""

from __future__ import annotations

import hashlib
import re

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel

# Vocabulary rows are drawn in blocks of this many, one generator per block, so that a row
# does not depend on how far the vocabulary is padded (the padding grows with TP).
VOCAB_BLOCK = 128

_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


def global_name(model: GPTModel, name: str) -> str:
    """The parameter's name in the whole model: layer indices counted over all stages, and a
    later stage's copy of tied embeddings named as the embedding it copies."""
    if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    layers = model.decoder.layers
    # layer_number is global and 1-based; the index in the name is this stage's.
    return re.sub(
        r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{layers[int(m.group(1))].layer_number - 1}.", name
    )


def initialize_weights(model: GPTModel, seed: int) -> None:
    """Draw every parameter of this stage from (seed, global name), as Megatron's init would
    for this config: N(0, std) weights, N(0, std/sqrt(2L)) output projections, zero biases,
    unit norm weights."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for local, param in model.named_parameters():
            name = global_name(model, local)
            full = _full(model.config, name, seed, _full_shape(param, tp))
            param.copy_(_shard(full, param, tp, rank))


def _full_shape(param: torch.Tensor, tp: int) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp
    return shape


def _shard(full: torch.Tensor, param: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This rank's part of the full tensor, by Megatron's rule: with stride s the full tensor
    is cut into s*tp pieces along the partition dim and rank r holds pieces r, r+tp, ...
    (the gated MLP's fc1, s=2, holds [gate; up] of its own rows)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, param.partition_stride
    pieces = torch.split(full, param.shape[dim] // stride, dim=dim)[rank::tp]
    return pieces[0] if stride == 1 else torch.cat(pieces, dim=dim)


def _full(config, name: str, seed: int, shape: list[int]) -> torch.Tensor:
    """The full fp32 tensor on the host (Megatron's CPU init also draws in fp32)."""
    if name.endswith("bias"):  # linear and norm biases
        return torch.zeros(shape)
    if re.search(r"(layernorm|layer_norm)(\.|_)weight$", name):
        return torch.ones(shape)
    init = _init_method(config, name)
    full = torch.empty(shape)
    if name not in _VOCAB_ROWS:
        init(full, generator=_generator(seed, name))
        return full
    for block, start in enumerate(range(0, shape[0], VOCAB_BLOCK)):
        rows = full[start : start + VOCAB_BLOCK]
        if len(rows) < VOCAB_BLOCK:  # the last block: drawn whole, as under a longer padding
            drawn = torch.empty(VOCAB_BLOCK, *shape[1:])
            init(drawn, generator=_generator(seed, f"{name}/{block}"))
            rows.copy_(drawn[: len(rows)])
        else:
            init(rows, generator=_generator(seed, f"{name}/{block}"))
    return full


def _init_method(config, name: str):
    """The init method Megatron gives this parameter (`TransformerConfig.*init_method`)."""
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return config.output_layer_init_method
    if name in ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight"):
        return config.embedding_init_method
    if name.endswith(("linear_qkv.weight", "linear_fc1.weight")) or name == "output_layer.weight":
        return config.init_method
    # A new kind of parameter would otherwise keep Megatron's layout-dependent draw.
    raise ValueError(f"no layout-independent initialisation for parameter {name}")


def _generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
