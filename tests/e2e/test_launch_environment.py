"""What `launch.torchrun` sets in its workers' environment before CUDA starts in them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers.e2e import ENV, REPO


def _worker_sees(environment: dict) -> str:
    command = [sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc-per-node=1", "--no-python"]
    result = subprocess.run(
        [*command, "printenv", "CUDA_DEVICE_MAX_CONNECTIONS"], cwd=REPO, env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


@pytest.mark.parametrize("users, expected", [(None, "1"), ("8", "8")], ids=["unset", "set-by-the-user"])
def test_workers_get_one_cuda_connection_unless_the_user_chose(users, expected):
    """Megatron-Core's communication/compute overlap needs CUDA_DEVICE_MAX_CONNECTIONS=1."""
    environment = {k: v for k, v in ENV.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    if users is not None:
        environment["CUDA_DEVICE_MAX_CONNECTIONS"] = users
    assert _worker_sees(environment) == expected
