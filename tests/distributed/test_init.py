"""One seed, one model: `build_model`'s initial weights do not depend on the TP/PP layout.

A TP=2 x PP=2 run's weights, TP shards put back together, equal a single process's tensor
for tensor, for a GPT-2-style and a Llama-style model (grouped-query attention, SwiGLU);
and they are drawn from Megatron's own distributions for each parameter.
"""

from __future__ import annotations

import pytest
import torch
from helpers import REPO
from helpers.multiprocess import run_distributed

SEED = 5
VOCAB = 256  # padded for TP <= 2
TINY = (
    "model.num_layers=4",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.seq_length=32",
    f"train.seed={SEED}",
)
MODELS = {
    "gpt": ("configs/demo_cpu.yaml", TINY),
    "llama": ("configs/llama-1.4b.yaml", (*TINY, "model.num_query_groups=2", "model.ffn_hidden_size=96")),
}


def _full(param) -> torch.Tensor:
    """The whole tensor from every TP rank's shard: the inverse of Megatron's strided split."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    value = param.detach().clone()
    if not getattr(param, "tensor_model_parallel", False):
        return value
    group = ps.get_tensor_model_parallel_group()
    shards = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, value.contiguous(), group=group)
    dim, stride = param.partition_dim, param.partition_stride
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([p[j] for j in range(stride) for p in pieces], dim=dim)


def _worker(tp, pp, with_megatron_init=False):
    from unittest import mock

    import launch.model
    from launch.config import load_config
    from megatron_patches.init import global_name
    from megatron_patches.parallel import destroy_parallel, initialize_parallel

    def weights(model):
        return {global_name(model, n): _full(p) for n, p in model.named_parameters()}

    # A different process seed per layout: the weights must come from train.seed alone.
    initialize_parallel(tp, pp, seed=100 + tp * pp)
    out = {}
    for kind, (config, overrides) in MODELS.items():
        cfg = load_config(REPO / config, [*overrides, f"parallel.tp={tp}", f"parallel.pp={pp}"])
        out[kind] = weights(launch.model.build_model(cfg, VOCAB))
        if with_megatron_init:
            with mock.patch.object(launch.model, "initialize_weights", lambda model, seed: None):
                out[f"{kind}-megatron"] = weights(launch.model.build_model(cfg, VOCAB))
            out[f"{kind}-padded"] = launch.model.build_model(cfg, 2 * VOCAB).embedding.word_embeddings.weight.detach()
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_worker, 1, 1, 1, True)[0]


@pytest.fixture(scope="module")
def tp2_pp2():
    return run_distributed(_worker, 4, 2, 2)


@pytest.mark.parametrize("kind", MODELS)
def test_tp2_pp2_weights_equal_one_process(reference, tp2_pp2, kind):
    seen = set()
    for rank in tp2_pp2:
        for name, value in rank[kind].items():
            assert torch.equal(value, reference[kind][name]), name
            seen.add(name)
    assert seen == set(reference[kind])


@pytest.mark.parametrize("kind", MODELS)
def test_pipeline_stages_are_not_copies(tp2_pp2, kind):
    """Megatron's CPU init draws every stage from one stream: stage 1's first layer repeats
    stage 0's first draws (scaled).  No two weight matrices of the model may be correlated."""
    weights = {name: v for rank in tp2_pp2 for name, v in rank[kind].items() if v.dim() == 2}
    assert any(n.startswith("decoder.layers.2.") for n in tp2_pp2[-1][kind])
    heads = torch.stack([v.flatten()[:256] for v in weights.values()])
    correlation = (torch.corrcoef(heads) - torch.eye(len(weights))).abs()
    names = list(weights)
    i, j = divmod(int(correlation.argmax()), len(names))
    assert correlation[i, j] < 0.5, f"{names[i]} and {names[j]}: correlation {correlation[i, j]:.3f}"


def test_tied_output_layer_is_the_embedding(tp2_pp2):
    """The GPT model ties them: the last stage's copy starts equal to the first stage's."""
    first, last = tp2_pp2[0]["gpt"], tp2_pp2[-1]["gpt"]
    assert torch.equal(first["embedding.word_embeddings.weight"], last["embedding.word_embeddings.weight"])


@pytest.mark.parametrize("kind", MODELS)
def test_megatron_distributions(reference, kind):
    """Per parameter the same init as Megatron's: zero biases, unit norms, N(0, std) or
    N(0, std/sqrt(2L)) weights (std estimated from a few thousand draws: within 5 %)."""
    ours, megatron = reference[kind], reference[f"{kind}-megatron"]
    assert set(ours) == set(megatron)
    for name, value in ours.items():
        expected = megatron[name]
        if torch.all(expected == expected.flatten()[0]):
            assert torch.equal(value, expected), name
        else:
            assert abs(value.mean()) < 0.1 * expected.std(), name
            torch.testing.assert_close(value.std(), expected.std(), rtol=0.05, atol=0, msg=name)
    assert abs(ours["decoder.layers.0.mlp.linear_fc2.weight"].std() / 0.02 * 8**0.5 - 1) < 0.05
    # Drawn independently: no two tensors alike.
    weights = [v for v in ours.values() if v.dim() == 2]
    assert len({float(w.flatten()[0]) for w in weights}) == len(weights)


@pytest.mark.parametrize("kind", MODELS)
def test_rows_do_not_depend_on_vocabulary_padding(reference, kind):
    padded = reference[f"{kind}-padded"]
    assert padded.shape[0] == 2 * VOCAB
    assert torch.equal(padded[:VOCAB], reference[kind]["embedding.word_embeddings.weight"])
