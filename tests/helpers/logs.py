"""What a user's shell sees of a run: the library noise observed on this machine (which
`launch.quiet` must silence, each message by its own entry), the console's time stamp, and an
environment without the test runs' PYTHONWARNINGS=ignore."""

import os

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


# What the libraries print on a 2-rank CPU run (Megatron engine), its resume and a DeepSpeed run, verbatim:
# every one must be silenced, and each by its own entry.
NOISY_WARNINGS = [
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to local implementations of "
                  "multi_tensor_applier and multi_tensor_scale"),
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."),
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to local implementations of "
                  "multi_tensor_applier, multi_tensor_l2norm, and multi_tensor_scale"),
    (UserWarning, "Apex is not installed. Falling back to Torch Norm"),
    (UserWarning, "full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer."),
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated. "
                    "Please use `torch.distributed.all_gather_single` instead."),
    (FutureWarning, "`load_state_dict` is deprecated and will be removed in future versions. "
                    "Please use `load` instead."),
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor."),
]  # fmt: skip


NOISY_LOG_LINES = [
    ("megatron.core.rerun_state_machine", "Implicit initialization of Rerun State Machine!"),
    ("megatron.core.rerun_state_machine", "RerunStateMachine initialized in mode RerunMode.DISABLED"),
    ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."),
]


NOISE = [message for _, message in NOISY_WARNINGS + NOISY_LOG_LINES]


# The environment of a user's shell: no PYTHONWARNINGS=ignore (unlike helpers.e2e.ENV).
USER_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
