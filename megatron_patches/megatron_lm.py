"""Megatron-LM's own `pretrain_gpt.py` with the loss reweighted, as a drop-in:

    torchrun ... -m megatron_patches.megatron_lm <pretrain_gpt.py's arguments> \\
        --reweight-strategy linupper --reweight-temperature 0.4 --reweight-warmup-steps 1000

with Megatron-LM's root (the folder holding `pretrain_gpt.py`) on PYTHONPATH.  The script runs
as it is, `__main__` block included; only its `loss_func` is replaced, through the two pieces a
fork of pretrain_gpt.py can use directly:

* `add_reweight_args`: the `--reweight-*` flags, one per field of `ReweightSettings` (the
  same names, defaults and checks as the `reweight:` section of this project's configs);
* `reweighted_loss_func(loss_func)`: wraps pretrain_gpt.py's `loss_func(loss_mask,
  output_tensor, model=None)`.  The original still runs, so Megatron-LM's `lm loss` report
  and its NaN/Inf/spiky-loss checks are untouched; the returned loss is `ReweightedLoss`'s,
  and the reweighting statistics join the report as one-element values, which Megatron-LM
  averages over micro-batches and logs.  In evaluation (no grad) the original's loss is
  returned unchanged.

The schedule's step is Megatron-LM's `args.curr_iteration`, which a `--load` restores, so a
resumed run continues its warm-up and annealing where the checkpoint left them.
"""

from __future__ import annotations

import argparse
import builtins
import functools
import importlib.util
import sys
import typing
from dataclasses import fields
from pathlib import Path

import torch

from megatron_patches.loss import ReweightedLoss
from megatron_patches.megatron_lm_cpu import enable_megatron_lm_cpu_mode
from megatron_patches.reweighting import STRATEGIES, STRATEGY_ALIASES, ReweightSettings

# Megatron-LM's training loop is not versioned apart from the megatron-core it ships with;
# this is the line whose loss contract (train_step's report shapes, pretrain_gpt.py's
# loss_func) this module was tested against.
SUPPORTED_MEGATRON_CORE = "0.16."
TESTED_MEGATRON_CORE = "0.16.1"

_HELP = {
    "strategy": "f(x) of the normalised loss: " + ", ".join(STRATEGIES) + " (uniform = Megatron-LM's loss)",
    "temperature": "r > 0: small = sharp weights, large = near uniform",
    "delta": "losses are normalised to [-delta, delta]",
    "warmup_steps": "iterations of uniform weights (or of --reweight-warmup-temperature) first",
    "warmup_temperature": "temperature during warm-up; unset = uniform weights",
    "anneal_steps": "after warm-up, 1/temperature moves linearly to the target's over this many iterations",
    "unit": "what one weight applies to: sequence (document needs launch.pretrain: the loss_func gets no tokens)",
    "max_segments_per_sample": "document slots per sample with --reweight-unit document",
}

# Statistics of ReweightedLoss's report that Megatron-LM logs, under the names it shows.
_LOGGED_STATISTICS = {
    "weighted_loss": "weighted loss",
    "ess": "weight ess",
    "max_weight": "max weight",
    "entropy": "weight entropy",
    "invalid_fraction": "invalid fraction",
}


def flag(field_name: str) -> str:
    """The command-line flag of a ReweightSettings field: warmup_steps → --reweight-warmup-steps."""
    return "--reweight-" + field_name.replace("_", "-")


def add_reweight_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's `extra_args_provider`: the `--reweight-*` flags."""
    group = parser.add_argument_group("loss reweighting (Sow et al., ICLR 2025)")
    hints = typing.get_type_hints(ReweightSettings)
    for setting in fields(ReweightSettings):
        kind = hints[setting.name]
        if setting.name == "strategy":
            group.add_argument(
                flag(setting.name),
                default=setting.default,
                choices=[*STRATEGIES, *STRATEGY_ALIASES],
                help=_HELP[setting.name],
            )
        elif typing.get_origin(kind) is typing.Literal:
            group.add_argument(
                flag(setting.name), default=setting.default, choices=typing.get_args(kind), help=_HELP[setting.name]
            )
        else:
            number = float if float in typing.get_args(kind) else kind  # Optional[float] → float
            group.add_argument(flag(setting.name), type=number, default=setting.default, help=_HELP[setting.name])
    return parser


def settings_from_args(args: argparse.Namespace) -> ReweightSettings:
    values = {setting.name: getattr(args, "reweight_" + setting.name) for setting in fields(ReweightSettings)}
    values["strategy"] = STRATEGY_ALIASES.get(values["strategy"], values["strategy"])
    return ReweightSettings(**values)


def refusals(args: argparse.Namespace) -> list[str]:
    """What this loss cannot honour in a run of these Megatron-LM arguments, naming the flag."""
    from megatron.core import package_info

    problems = []
    if not package_info.__version__.startswith(SUPPORTED_MEGATRON_CORE):
        problems.append(
            f"Megatron-LM/megatron-core {package_info.__version__} is not supported: the reweighted loss"
            f" follows the loss contract of core_v{SUPPORTED_MEGATRON_CORE}x (tested with {TESTED_MEGATRON_CORE})"
        )
    unsupported = {
        "hybrid_context_parallel": "--hybrid-context-parallel splits samples over CP ranks unevenly",
        "sft": "--sft packs several variable-length samples into one sequence (THD)",
        "use_legacy_models": "--use-legacy-models is not the Megatron-Core GPTModel this loss reads",
    }
    problems += [
        f"{why}: the per-sample losses cannot be formed; leave it off"
        for name, why in unsupported.items()
        if getattr(args, name, False)
    ]
    train_steps = args.train_iters if args.train_iters is not None else sys.maxsize  # None: sample-based, unknown here
    settings = settings_from_args(args)
    problems += settings.problems(train_steps, name=flag, train_steps_name="--train-iters")
    if settings.unit == "document":
        problems.append(
            f"{flag('unit')} document needs each token's document, which pretrain_gpt.py's loss_func is"
            f" not given: leave it at sequence, or train with launch.pretrain (reweight.unit)"
        )
    return problems


def reweighted_loss_func(loss_func):
    """pretrain_gpt.py's `loss_func(loss_mask, output_tensor, model=None)` with the loss reweighted.

    The flags are read from Megatron-LM's global args at the first training call (they need
    `add_reweight_args`); a setting it cannot honour stops the run there with the reason.
    """
    reweighted: list[ReweightedLoss] = []  # built once, when Megatron's args and groups exist

    @functools.wraps(loss_func)
    def reweighted_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor, model=None):
        loss, num_tokens, report = loss_func(loss_mask, output_tensor, model=model)
        if not torch.is_grad_enabled():  # evaluation: the plain loss
            return loss, num_tokens, report
        from megatron.training import get_args

        args = get_args()
        if not reweighted:
            problems = refusals(args)
            if problems:
                raise SystemExit("reweighted loss: " + "; ".join(problems))
            settings = settings_from_args(args)
            reweighted.append(ReweightedLoss(settings.schedule(), delta=settings.delta))
        weigh = reweighted[0]
        weigh.schedule.step = args.curr_iteration  # the iterations done: restored by --load
        weighted, one_token, statistics = weigh(loss_mask, None, output_tensor.view(loss_mask.shape).float())
        for key, name in _LOGGED_STATISTICS.items():
            report[name] = statistics[key].detach().to(torch.float32).view(1)
        report["inverse temperature"] = torch.tensor([weigh.schedule.inverse_temperature()], device=weighted.device)
        return weighted, one_token, report

    return reweighted_loss


def _pretrain_with_reweighting(pretrain):
    """Megatron-LM's `pretrain` as pretrain_gpt.py's __main__ calls it, with the flags added,
    checked before initialisation, and the script's `loss_func` reweighted."""

    @functools.wraps(pretrain)
    def wrapper(
        dataset_provider, model_provider, model_type, forward_step_func, *args, extra_args_provider=None, **kwargs
    ):
        def extra_args(parser):
            parser = add_reweight_args(parser)
            return parser if extra_args_provider is None else extra_args_provider(parser)

        from megatron.training.arguments import parse_args

        problems = refusals(parse_args(extra_args))
        if problems:
            raise SystemExit("megatron_patches.megatron_lm: " + "; ".join(problems))
        script = forward_step_func.__globals__  # pretrain_gpt.py's namespace
        if "loss_func" not in forward_step_func.__code__.co_names or "loss_func" not in script:
            raise SystemExit(
                "megatron_patches.megatron_lm: this pretrain_gpt.py's forward_step does not call a"
                f" module-level loss_func (Megatron-LM core_v{TESTED_MEGATRON_CORE} does); use"
                " reweighted_loss_func in your own script instead"
            )
        script["loss_func"] = reweighted_loss_func(script["loss_func"])
        return pretrain(
            dataset_provider,
            model_provider,
            model_type,
            forward_step_func,
            *args,
            extra_args_provider=extra_args,
            **kwargs,
        )

    return wrapper


def run_script(path: str) -> None:
    """Run a Megatron-LM script as `__main__`, as `python path` would, except that
    `sys.modules["__main__"]` stays the launcher (unlike runpy): a process multiprocessing
    spawns (dist_checkpointing's write-results queue) then re-imports the launcher, not the
    script, whose imports need the CPU layer on a machine without Triton."""
    sys.argv[0] = path
    code = compile(Path(path).read_bytes(), path, "exec")
    exec(
        code,
        {"__name__": "__main__", "__file__": path, "__spec__": None, "__package__": None, "__builtins__": builtins},
    )


def main() -> None:
    enable_megatron_lm_cpu_mode()  # on a machine without CUDA only (tests)
    spec = importlib.util.find_spec("pretrain_gpt")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "megatron_patches.megatron_lm: put Megatron-LM's root (the folder with pretrain_gpt.py) on PYTHONPATH"
        )
    import megatron.training

    # pretrain_gpt.py imports `pretrain` from megatron.training when it runs.
    megatron.training.pretrain = _pretrain_with_reweighting(megatron.training.pretrain)
    run_script(spec.origin)


if __name__ == "__main__":
    main()
