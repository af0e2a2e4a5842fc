"""The Megatron-LM drop-in's flags and loss function, without Megatron-LM's training loop:
the `--reweight-*` flags are the config's settings, what it cannot honour is refused naming
the flag, and evaluation keeps `pretrain_gpt.py`'s own loss.  tests/e2e/test_megatron_lm.py
runs the loop itself."""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron_patches.megatron_lm import add_reweight_args, refusals, reweighted_loss_func, settings_from_args
from megatron_patches.reweighting import ReweightSettings


def parsed(*argv: str) -> argparse.Namespace:
    args = add_reweight_args(argparse.ArgumentParser()).parse_args(list(argv))
    args.train_iters, args.hybrid_context_parallel, args.sft, args.use_legacy_models = 100, False, False, False
    return args


def test_the_flags_are_the_config_settings_with_their_defaults_and_aliases():
    assert settings_from_args(parsed()) == ReweightSettings()
    assert settings_from_args(parsed("--reweight-strategy", "mid", "--reweight-warmup-temperature", "100")) == (
        ReweightSettings(strategy="quadratic", warmup_temperature=100.0)
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--reweight-temperature", "0"], "--reweight-temperature=0.0 must be > 0"),
        (["--reweight-delta", "-1"], "--reweight-delta=-1.0 must be > 0"),
        (["--reweight-anneal-steps", "-1"], "--reweight-anneal-steps=-1 must be >= 0"),
        (["--reweight-strategy", "linupper", "--reweight-warmup-steps", "100"],
         "--reweight-warmup-steps=100 >= --train-iters=100: the run would never reweight"),
    ],
)  # fmt: skip
def test_settings_it_cannot_honour_are_refused_naming_the_flag(argv, message):
    assert any(problem.startswith(message) for problem in refusals(parsed(*argv)))


@pytest.mark.parametrize("flag", ["hybrid_context_parallel", "sft", "use_legacy_models"])
def test_layouts_without_per_sample_losses_are_refused_naming_the_flag(flag):
    args = parsed()
    setattr(args, flag, True)
    assert [problem for problem in refusals(args) if "--" + flag.replace("_", "-") in problem]


def test_evaluation_gets_pretrain_gpts_own_loss_untouched():
    def plain_loss_func(loss_mask, output_tensor, model=None):
        return output_tensor.sum(), loss_mask.sum(), {"lm loss": output_tensor.sum().view(1)}

    mask, losses = torch.ones(2, 4), torch.rand(2, 4)
    with torch.no_grad():
        assert reweighted_loss_func(plain_loss_func)(mask, losses) == plain_loss_func(mask, losses)
