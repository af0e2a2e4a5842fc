"""Shared fixtures: the demo corpus, built once per test session."""

from __future__ import annotations

import pytest

from data_prep import demo as demo_data


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    demo_data.build_demo_data(out)
    return out
