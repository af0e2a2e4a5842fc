"""`model.precision=bf16` end to end on CPU: both engines, GPT-2- and Llama-style models.

bf16 runs follow the fp32 run of the same model closely (the first steps of a tiny model
move the loss little, so bf16's rounding shows only in the fifth digit), their checkpoints
hold bf16 weights with fp32 optimizer state, and a stopped run resumes exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.e2e import pretrain, rows
from torch.distributed.checkpoint import FileSystemReader

LLAMA = (
    "model.position_embedding=rope",
    "model.normalization=RMSNorm",
    "model.activation=swiglu",
    "model.add_bias_linear=false",
    "model.untie_embeddings=true",
    "model.ffn_hidden_size=176",
)
MODELS = {"gpt2": (), "llama": LLAMA}  # the demo model is GPT-2-style
# ZeRO-1 steps bf16 with DeepSpeed's BF16_Optimizer (ZeRO-2 and 3 with its ZeRO optimizers,
# whose fp32 steps tests/distributed/test_deepspeed_parity.py compares with Megatron's).
RUNS = {
    "megatron-gpt2": ("megatron", "gpt2"),
    "megatron-llama": ("megatron", "llama"),
    "zero1-llama": ("deepspeed", "llama"),
}
BF16 = "model.precision=bf16"
# bf16 against fp32, measured: at most 3e-5 relative in these 6 steps, for every run here.
FP32_RTOL = 1e-3


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")  # Megatron's sample indices, built once for all runs


def overrides(cache_dir: Path, run: str) -> tuple[list[str], str]:
    """The run's settings and config file."""
    engine, model = RUNS[run]
    settings = [f"data.cache_dir={cache_dir}", "train.steps=6", *MODELS[model]]
    if engine == "megatron":
        return settings, "configs/demo_cpu.yaml"
    return [*settings, f"deepspeed.zero_stage={run[4]}"], "configs/demo_cpu_deepspeed.yaml"


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, demo_dir, cache_dir):
    """`unbroken(run, precision)`: the directory of that run from start to end, run once."""
    done = {}

    def run(name: str, precision: str) -> Path:
        if (name, precision) not in done:
            run_dir = tmp_path_factory.mktemp(f"{precision}-{name}")
            settings, config = overrides(cache_dir, name)
            pretrain(run_dir, demo_dir, *settings, f"model.precision={precision}", config=config)
            done[name, precision] = run_dir
        return done[name, precision]

    return run


@pytest.mark.parametrize(
    "run", ["megatron-gpt2", "megatron-llama", pytest.param("zero1-llama", marks=pytest.mark.slow)]
)
def test_bf16_trains_like_fp32(run, unbroken):
    run_dir = unbroken(run, "bf16")
    ours, theirs = rows(run_dir), rows(unbroken(f"megatron-{RUNS[run][1]}", "fp32"))
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == [2, 4, 6]
    for row, expected in zip(ours, theirs):
        assert row["loss"] == pytest.approx(expected["loss"], rel=FP32_RTOL)
    assert ours[-1]["loss"] < ours[0]["loss"]
    assert [r["loss"] for r in ours] != [r["loss"] for r in theirs]  # bf16 rounding: really bf16
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]


@pytest.mark.parametrize("run", [pytest.param("megatron-gpt2", marks=pytest.mark.slow), "megatron-llama"])
def test_megatron_checkpoint_holds_bf16_weights_and_fp32_optimizer_state(run, unbroken):
    checkpoint = unbroken(run, "bf16") / "checkpoints/step_00000006"
    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    dtypes = {key: str(item.properties.dtype) for key, item in metadata.items() if hasattr(item, "properties")}
    weights = {key: dtype for key, dtype in dtypes.items() if not key.startswith("optimizer.")}
    assert "embedding.word_embeddings.weight" in weights and "decoder.final_layernorm.weight" in weights
    assert set(weights.values()) == {"torch.bfloat16"}  # learned positions and norms included
    assert {dtype for key, dtype in dtypes.items() if key.startswith("optimizer.state.")} == {"torch.float32"}


@pytest.mark.slow
@pytest.mark.parametrize("run", ["megatron-llama", "zero1-llama"])
def test_bf16_run_stops_and_resumes_exactly(run, tmp_path, demo_dir, cache_dir, unbroken):
    settings, config = overrides(cache_dir, run)
    pretrain(tmp_path, demo_dir, *settings, BF16, "train.exit_after=4", config=config)
    result = pretrain(tmp_path, demo_dir, *settings, BF16, config=config)
    assert "resuming from" in result.stdout and "step_00000004" in result.stdout
    for kind, keys in (
        ("train", ("step", "loss", "weighted_loss", "lr", "grad_norm")),
        ("valid", ("step", "valid_loss")),
    ):
        expected = [[r[k] for k in keys] for r in rows(unbroken(run, "bf16"), kind)]
        assert [[r[k] for k in keys] for r in rows(tmp_path, kind)] == expected
