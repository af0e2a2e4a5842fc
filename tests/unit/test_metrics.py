"""metrics.jsonl on resume: rows after the checkpoint dropped, a torn last line tolerated."""

from __future__ import annotations

import json

import pytest

from launch.metrics import rows_up_to


def write_rows(path, steps, tail=""):
    path.write_text("".join(json.dumps({"kind": "train", "step": s}) + "\n" for s in steps) + tail)


def test_rows_after_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_rows(path, [2, 4, 6, 8])
    kept, torn = rows_up_to(path, 4)
    assert [json.loads(line)["step"] for line in kept] == [2, 4] and torn == 0


def test_a_torn_last_line_is_dropped_and_measured(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_rows(path, [2, 4], tail='{"kind": "tra')
    kept, torn = rows_up_to(path, 4)
    assert [json.loads(line)["step"] for line in kept] == [2, 4] and torn == len('{"kind": "tra')


def test_a_broken_line_before_the_last_is_corruption_named_by_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 2}\n{"kind": "tr\n{"kind": "train", "step": 4}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2 is not a JSON row"):
        rows_up_to(path, 4)
