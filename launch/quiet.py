"""Known, harmless library noise, silenced by exact message so that a run's log shows what matters.

Every entry names one message (a regular expression matched against the whole message) and why
it is harmless here; anything else still shows, including other warnings of the same library.
`install()` is called first thing by every entry point (`launch.pretrain` and each of
`launch.tools`), before Megatron-Core or DeepSpeed is imported (warnings raised at import time
are filtered too). Found by running `python -m launch.torchrun --nproc-per-node 2 -m
launch.pretrain --config configs/demo_cpu.yaml` with both engines, a resume, and the tools on
its run.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import NamedTuple


class NoisyWarning(NamedTuple):
    category: type[Warning]
    message: str  # regular expression for the whole message
    why: str


class NoisyLogLine(NamedTuple):
    logger: str
    message: str  # regular expression for the whole formatted message
    why: str


WARNINGS = (
    NoisyWarning(
        UserWarning,
        r"Transformer Engine and Apex are not installed\. Falling back to (Torch optimizers|local implementations of "
        r"multi_tensor_applier(, multi_tensor_l2norm,)? and multi_tensor_scale)\.?",
        "Megatron-Core on an install without TE/Apex (every CPU run): the torch fallbacks are what we use",
    ),
    NoisyWarning(
        UserWarning,
        r"Apex is not installed\. Falling back to Torch Norm",
        "the local (non-TE) layer spec uses torch's LayerNorm/RMSNorm on purpose",
    ),
    NoisyWarning(
        UserWarning,
        r"full scope is deprecated\. Use empty cuda_graph_scope to capture the whole layer\.",
        "Megatron's own TransformerConfig default (cuda_graph_scope='full') warns about itself; CUDA graphs are off",
    ),
    NoisyWarning(
        FutureWarning,
        r"`torch\.distributed\.all_gather_into_tensor` is deprecated\. "
        r"Please use `torch\.distributed\.all_gather_single` instead\.",
        "raised inside DeepSpeed's ZeRO all-gather; nothing for a user to change",
    ),
    NoisyWarning(
        FutureWarning,
        r"`load_state_dict` is deprecated and will be removed in future versions\. Please use `load` instead\.",
        "Megatron-Core 0.16's dist_checkpointing loads every resume through torch's old name for"
        " torch.distributed.checkpoint.load; the same function, nothing for a user to change",
    ),
    NoisyWarning(
        FutureWarning,
        r"Please use DTensor instead and we are deprecating ShardedTensor\.",
        "the ShardedTensors are Megatron-Core's dist_checkpointing's own (its torch strategy builds them"
        " at every resume); nothing for a user to change",
    ),
)

LOG_RECORDS = (
    NoisyLogLine(
        "megatron.core.rerun_state_machine",
        r"Implicit initialization of Rerun State Machine!",
        "Megatron creates its rerun state machine (result validation) on first use; it is off (disabled mode)",
    ),
    NoisyLogLine(
        "megatron.core.rerun_state_machine",
        r"RerunStateMachine initialized in mode RerunMode\.DISABLED",
        "the second half of the line above",
    ),
    NoisyLogLine(
        "DeepSpeed",
        r"Setting accelerator to CPU\. If you have GPU or other accelerator, we were unable to detect it\.",
        "DeepSpeed on a machine without CUDA (CPU runs and tests): CPU is what we asked for",
    ),
)


class _DropMessages(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = [re.compile(pattern) for pattern in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.fullmatch(message) for pattern in self.patterns)


_installed = False


def install() -> None:
    """Silence the listed messages (idempotent); other warnings and log lines are untouched."""
    global _installed
    if _installed:
        return
    _installed = True
    for entry in WARNINGS:
        # warnings matches `message` at the start of the text: \Z makes it the whole message
        warnings.filterwarnings("ignore", message=f"(?:{entry.message})\\Z", category=entry.category)
    by_logger: dict[str, list[str]] = {}
    for entry in LOG_RECORDS:
        by_logger.setdefault(entry.logger, []).append(entry.message)
    for name, patterns in by_logger.items():
        # a filter on the logger itself: it holds however the library adds its handlers later
        logging.getLogger(name).addFilter(_DropMessages(patterns))
