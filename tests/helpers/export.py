"""The export and evaluate tools run as a user runs them, offline, and their logits against Megatron's."""

import os
import subprocess
import sys

import torch

from helpers import REPO

LLAMA_STYLE = (
    "model.position_embedding=rope", "model.normalization=RMSNorm", "model.activation=swiglu",
    "model.add_bias_linear=false", "model.num_query_groups=2", "model.untie_embeddings=true",
)  # fmt: skip


def offline_env(tmp_path) -> dict:
    """No hub: every model, tokenizer and data set must come from local files."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "PYTHONWARNINGS": "ignore",
    }


def run_module(module: str, *args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True, env=env
    )


def assert_logits_equal(hf: torch.Tensor, megatron: torch.Tensor) -> float:
    """fp32 on CPU: relative 1e-4 (absolute 1e-4 of the largest logit for those near 0)."""
    torch.testing.assert_close(hf, megatron, rtol=1e-4, atol=1e-4 * megatron.abs().max().item())
    return ((hf - megatron).abs().max() / megatron.abs().max()).item()
