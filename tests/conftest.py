"""Shared fixtures: the demo corpus, built once per test session."""

from __future__ import annotations

import pytest
from helpers.e2e import LONG, pretrain

from data_prep import demo as demo_data


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    demo_data.build_demo_data(out)
    return out


@pytest.fixture(scope="session")
def unbroken(tmp_path_factory, demo_dir):
    """The LONG run from start to end in one go: what every stopped and resumed run must equal."""
    run_dir = tmp_path_factory.mktemp("unbroken")
    pretrain(run_dir, demo_dir, *LONG)
    return run_dir
