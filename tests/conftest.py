"""Shared fixtures (the demo corpus, built once per test session) and the markers by folder.

tests/unit: one process; tests/distributed: real gloo groups of processes; tests/e2e: runs of
the training entry point.  A test's folder is its marker, so `-m 'not e2e'` selects by kind.
"""

from __future__ import annotations

from pathlib import Path

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


def pytest_collection_modifyitems(items):
    for item in items:
        kind = Path(item.fspath).parent.name
        if kind in ("distributed", "e2e"):
            item.add_marker(kind)
