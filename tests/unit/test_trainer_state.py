"""The trainer state of a checkpoint: the registered parts by name, and the names they had before."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.checkpoint import CheckpointError, TrainerState


class Counter:
    def __init__(self, value=0):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def test_parts_are_saved_and_restored_by_name_and_read_under_their_former_names():
    saved, restored = TrainerState(), TrainerState()
    saved.register("first", Counter(1))
    saved.register("second", Counter(2))
    first, second = Counter(), Counter()
    restored.register("first", first)
    restored.register("second", second, formerly=("old_name",))
    restored.load_state_dict(saved.state_dict(), Path("step_00000001"))
    assert (first.value, second.value) == (1, 2)
    restored.load_state_dict({"first": {"value": 3}, "old_name": {"value": 4}}, Path("step_00000001"))
    assert (first.value, second.value) == (3, 4)


def test_a_part_missing_from_the_checkpoint_is_named():
    state = TrainerState()
    state.register("first", Counter())
    with pytest.raises(CheckpointError, match=r"step_00000001/trainer_state.json has no 'first'"):
        state.load_state_dict({}, Path("step_00000001"))


@pytest.mark.parametrize(
    "name, formerly", [("step", ()), ("config", ()), ("first", ()), ("other", ("first",)), ("other", ("old",))]
)
def test_a_name_that_is_taken_is_refused(name, formerly):
    state = TrainerState()
    state.register("first", Counter(), formerly=("old",))
    with pytest.raises(ValueError, match="is taken"):
        state.register(name, Counter(), formerly=formerly)
