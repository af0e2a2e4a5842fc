"""Specification of `megatron_patches.reweighting`: the method of Sow et al., "Dynamic Loss-Based
Sample Reweighting for Improved Large Language Model Pretraining" (ICLR 2025), as the README's
"The method, exactly" states it.

For the losses l_i of one global batch and the valid set V (flagged valid, finite loss):

    x_i = (2δ l_i − δ (l_max + l_min)) / max(l_max − l_min, ε)          min/max over V, ε = 1e-6
    w_i = n_i exp((f(x_i) − max_V f) / r) / Σ_{j∈V} n_j exp((f(x_j) − max_V f) / r)

with n_i = 1 (the paper) or the sample's token count (the token prior). Invalid samples
get weight 0 and never reach min, max or the softmax. The weights of a batch split over
data-parallel ranks are those of the whole batch, bit for bit, and nothing reads a tensor
value on the host.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers.host_reads import HostReadRecorder, SyncingOpRecorder
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_patches.reweighting import (
    STRATEGIES,
    ReweightSchedule,
    compute_sample_weights,
    global_sample_weights,
    weight_statistics,
)

# Every registered strategy: a new one is held to every property below, and to the references
# (which fail, naming it, until it has one).
NAMES = list(STRATEGIES)


PROPERTY = settings(max_examples=60, deadline=None)


REFERENCE_F = {
    "uniform": lambda x, d: np.zeros_like(x),
    "linupper": lambda x, d: np.minimum(x + d, d),
    "quadratic": lambda x, d: 1.0 - x**2 / d**2,
    "extremes": lambda x, d: np.abs(x),
    "upper": lambda x, d: x / 2 + d / 2,
}


def reference_f(losses, valid, strategy, delta):
    """f(x_i) for the valid samples, in order."""
    valid_losses = np.asarray(losses, dtype=np.float64)[valid]
    lo, hi = valid_losses.min(), valid_losses.max()
    x = (2 * delta * valid_losses - delta * (hi + lo)) / max(hi - lo, 1e-6)
    return REFERENCE_F[strategy](x, delta)


def reference_weights(losses, strategy, r, delta=1.0, valid=None, counts=None):
    losses = np.asarray(losses, dtype=np.float64)
    ok = np.isfinite(losses) if valid is None else np.isfinite(losses) & np.asarray(valid, dtype=bool)
    w = np.zeros(len(losses))
    if not ok.any():
        return w
    f = reference_f(losses, ok, strategy, delta)
    e = np.exp((f - f.max()) / r)
    if counts is not None:
        e = e * np.asarray(counts, dtype=np.float64)[ok]
    w[ok] = e / e.sum()
    return w


def weights_of(losses, strategy, r, delta=1.0, valid=None, counts=None):
    """The module's weights for one whole batch (no process group), as numpy."""
    w = compute_sample_weights(
        torch.tensor(losses, dtype=torch.float64),
        strategy=strategy,
        temperature=r,
        delta=delta,
        valid=None if valid is None else torch.tensor(valid),
        token_counts=None if counts is None else torch.tensor(counts),
    )
    assert w.dtype == torch.float64 and w.shape == (len(losses),)
    return w.numpy()


def softmax_of_exponents(exponents):
    e = np.exp(np.asarray(exponents, dtype=np.float64))
    return e / e.sum()


HAND_X = [-1.0, -0.5, 0.0, 1.0]


HAND_F = {
    "uniform": [0.0, 0.0, 0.0, 0.0],
    "linupper": [0.0, 0.5, 1.0, 1.0],  # min(x + 1, 1)
    "quadratic": [0.0, 0.75, 1.0, 0.0],  # 1 − x²
    "extremes": [1.0, 0.5, 0.0, 1.0],  # |x|
    "upper": [0.0, 0.25, 0.5, 1.0],  # x/2 + 1/2
}


# w = softmax((f − max f) / r); the exponents (f − max f) / r written out:
HAND_EXPONENTS = {
    1.0: {
        "uniform": [0, 0, 0, 0],
        "linupper": [-1, -0.5, 0, 0],
        "quadratic": [-1, -0.25, 0, -1],
        "extremes": [0, -0.5, -1, 0],
        "upper": [-1, -0.75, -0.5, 0],
    },
    0.5: {
        "uniform": [0, 0, 0, 0],
        "linupper": [-2, -1, 0, 0],
        "quadratic": [-2, -0.5, 0, -2],
        "extremes": [0, -1, -2, 0],
        "upper": [-2, -1.5, -1, 0],
    },
}


def test_every_strategy_has_an_independent_reference():
    assert sorted(REFERENCE_F) == sorted(HAND_F) == sorted(NAMES)
    assert all(sorted(exponents) == sorted(NAMES) for exponents in HAND_EXPONENTS.values())


@pytest.mark.parametrize("strategy", NAMES)
def test_hand_worked_f_of_normalised_losses(strategy):
    f = STRATEGIES[strategy](torch.tensor(HAND_X, dtype=torch.float64), 1.0)
    np.testing.assert_allclose(f.numpy(), HAND_F[strategy], rtol=0, atol=1e-15)


@pytest.mark.parametrize("r", [1.0, 0.5])
@pytest.mark.parametrize("strategy", NAMES)
def test_hand_worked_weights(strategy, r):
    losses = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=torch.float64)
    expected = softmax_of_exponents(HAND_EXPONENTS[r][strategy])
    whole = global_sample_weights(losses, torch.ones(4, dtype=torch.bool), strategy=strategy, temperature=r)
    local = compute_sample_weights(losses, strategy=strategy, temperature=r, group=None)
    np.testing.assert_allclose(whole.numpy(), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(local.numpy(), expected, rtol=0, atol=1e-12)


def test_hand_worked_weights_with_delta_two():
    """δ scales x to [-2, 2]: x = (4l − 12)/4 = [-2, -1, 0, 2]."""
    losses = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=torch.float64)
    # linupper: f = min(x + 2, 2) = [0, 1, 2, 2]; r = 1 → exponents [-2, -1, 0, 0]
    linupper = compute_sample_weights(losses, strategy="linupper", temperature=1.0, delta=2.0)
    np.testing.assert_allclose(linupper.numpy(), softmax_of_exponents([-2, -1, 0, 0]), rtol=0, atol=1e-12)
    # quadratic: f = 1 − x²/4 = [0, 0.75, 1, 0], the same as with δ = 1
    quadratic = compute_sample_weights(losses, strategy="quadratic", temperature=1.0, delta=2.0)
    np.testing.assert_allclose(quadratic.numpy(), softmax_of_exponents([-1, -0.25, 0, -1]), rtol=0, atol=1e-12)


def test_hand_worked_token_prior():
    """w_i ∝ n_i exp(f_i / r): linupper, r = 1, counts [1, 2, 3, 4]."""
    losses = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=torch.float64)
    w = compute_sample_weights(losses, strategy="linupper", temperature=1.0, token_counts=torch.tensor([1, 2, 3, 4]))
    unnormalised = np.array([1 * math.exp(-1), 2 * math.exp(-0.5), 3, 4])
    np.testing.assert_allclose(w.numpy(), unnormalised / unnormalised.sum(), rtol=0, atol=1e-12)


finite_losses = st.one_of(st.floats(0.0, 20.0), st.sampled_from([0.5, 2.0, 7.25]))  # repeats make ties


loss_lists = st.lists(finite_losses, min_size=1, max_size=64)


deltas = st.floats(0.25, 4.0)


temperatures = st.floats(0.05, 50.0)


names = st.sampled_from(NAMES)


# Bad entries: non-finite losses, or masked-out samples with losses far outside the rest.
BAD = {
    "nan": (math.nan, True),
    "+inf": (math.inf, True),
    "-inf": (-math.inf, True),
    "masked-high": (1e3, False),
    "masked-low": (-1e3, False),
}


entries = st.lists(st.one_of(finite_losses, st.sampled_from(sorted(BAD))), min_size=1, max_size=64)


def split_entries(items):
    """(losses, valid flags, indices of good entries) of a list mixing losses and BAD names."""
    losses = [BAD[e][0] if isinstance(e, str) else e for e in items]
    valid = [BAD[e][1] if isinstance(e, str) else True for e in items]
    good = [i for i, e in enumerate(items) if not isinstance(e, str)]
    return losses, valid, good


@PROPERTY
@given(entries, names, temperatures, deltas)
def test_weights_are_a_distribution_over_valid_samples(items, strategy, r, delta):
    losses, valid, good = split_entries(items)
    w = weights_of(losses, strategy, r, delta, valid=valid)
    bad = np.setdiff1d(np.arange(len(items)), good)
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    assert np.all(w[bad] == 0.0)
    if good:
        assert w[good].sum() == pytest.approx(1.0, abs=1e-12)


@PROPERTY
@given(entries, names, temperatures, deltas)
def test_invalid_samples_are_left_out_of_min_max_and_softmax(items, strategy, r, delta):
    """The weights of the valid samples are those of the valid samples alone."""
    losses, valid, good = split_entries(items)
    w = weights_of(losses, strategy, r, delta, valid=valid)
    if good:
        alone = weights_of([losses[i] for i in good], strategy, r, delta)
        np.testing.assert_allclose(w[good], alone, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("strategy", NAMES)
def test_all_invalid_gives_all_zeros(strategy):
    losses = [math.nan, math.inf, -math.inf, 2.0]
    w = weights_of(losses, strategy, 1.0, valid=[True, True, True, False])
    assert np.array_equal(w, np.zeros(4))


@PROPERTY
@given(loss_lists, names, temperatures, deltas)
def test_weights_equal_numpy_reference(losses, strategy, r, delta):
    np.testing.assert_allclose(
        weights_of(losses, strategy, r, delta), reference_weights(losses, strategy, r, delta), rtol=1e-9, atol=1e-12
    )


@PROPERTY
@given(entries, names, temperatures, deltas, st.data())
def test_weights_with_token_prior_equal_numpy_reference(items, strategy, r, delta, data):
    losses, valid, _ = split_entries(items)
    counts = data.draw(st.lists(st.integers(1, 4096), min_size=len(items), max_size=len(items)))
    got = weights_of(losses, strategy, r, delta, valid=valid, counts=counts)
    np.testing.assert_allclose(got, reference_weights(losses, strategy, r, delta, valid, counts), rtol=1e-9, atol=1e-12)


@PROPERTY
@given(loss_lists, names, temperatures, deltas, st.data())
def test_weights_are_permutation_equivariant(losses, strategy, r, delta, data):
    perm = data.draw(st.permutations(range(len(losses))))
    w = weights_of(losses, strategy, r, delta)
    permuted = weights_of([losses[i] for i in perm], strategy, r, delta)
    np.testing.assert_allclose(permuted, w[perm], rtol=1e-12, atol=1e-15)


@PROPERTY
@given(loss_lists, names, deltas)
def test_large_temperature_gives_uniform_weights(losses, strategy, delta):
    w = weights_of(losses, strategy, 1e9, delta)
    np.testing.assert_allclose(w, 1.0 / len(losses), rtol=0, atol=1e-6)


@PROPERTY
@given(st.lists(st.integers(0, 10).map(float), min_size=1, max_size=64), names, st.sampled_from([0.5, 1.0, 2.0]))
def test_small_temperature_gives_arg_max_split_among_ties(losses, strategy, delta):
    """r = 1e-4: all weight on the samples with the largest f, shared equally.

    Integer losses keep distinct f values at least 0.04 apart, so exp(−gap/r) is 0.
    """
    f = reference_f(losses, np.ones(len(losses), dtype=bool), strategy, delta)
    best = np.abs(f - f.max()) < 1e-9
    w = weights_of(losses, strategy, 1e-4, delta)
    np.testing.assert_allclose(w, np.where(best, 1.0 / best.sum(), 0.0), rtol=0, atol=1e-9)


@PROPERTY
@given(finite_losses, st.integers(1, 64), names, temperatures, deltas)
def test_equal_losses_give_uniform_weights(loss, n, strategy, r, delta):
    np.testing.assert_allclose(weights_of([loss] * n, strategy, r, delta), 1.0 / n, rtol=1e-12, atol=0)


@PROPERTY
@given(entries, names, temperatures, deltas, st.integers(1, 4096))
def test_equal_token_counts_change_nothing(items, strategy, r, delta, count):
    losses, valid, _ = split_entries(items)
    with_prior = weights_of(losses, strategy, r, delta, valid=valid, counts=[count] * len(items))
    np.testing.assert_allclose(with_prior, weights_of(losses, strategy, r, delta, valid=valid), rtol=1e-12, atol=1e-15)


# What each kind of strategy (`Strategy.favours`) does to the weights as the loss grows, below
# and above the middle of the batch's losses: 1 never falls, -1 never rises, 0 stays level.
KIND_SLOPES = {"nothing": (0, 0), "high": (1, 1), "medium": (1, -1), "ends": (-1, 1)}


NEUTRAL = [name for name in NAMES if STRATEGIES[name].favours == "nothing"]


def test_every_strategy_declares_a_kind_the_properties_know():
    assert {name: STRATEGIES[name].favours for name in NAMES if STRATEGIES[name].favours not in KIND_SLOPES} == {}


def assert_slope(losses, w, slope):
    """w in the order of the losses never falls (slope 1), never rises (-1) or stays level (0)."""
    steps = np.diff(w[np.argsort(losses, kind="stable")])
    # Rounding can put a sample at the middle on the wrong side of x = 0, where f is level.
    tolerance = 1e-6 * w.max(initial=0.0)
    assert np.all(np.abs(steps) <= tolerance) if slope == 0 else np.all(slope * steps >= -tolerance)


@PROPERTY
@given(loss_lists, names, temperatures, deltas)
def test_weights_rise_and_fall_with_the_loss_as_the_strategy_declares(losses, strategy, r, delta):
    below, above = KIND_SLOPES[STRATEGIES[strategy].favours]
    losses = np.asarray(losses)
    w = weights_of(losses.tolist(), strategy, r, delta)
    middle = (losses.min() + losses.max()) / 2
    lower, upper = losses <= middle, losses >= middle
    assert_slope(losses[lower], w[lower], below)
    assert_slope(losses[upper], w[upper], above)


@pytest.mark.parametrize("strategy", NAMES)
def test_the_lowest_middle_and_highest_loss_get_what_the_strategy_declares(strategy):
    """Losses [1, 2, 3, 5]: x = -1, -0.5, 0, 1, so 3 is the middle one."""
    low, _, middle, high = weights_of([1.0, 2.0, 3.0, 5.0], strategy, 1.0)
    favours = STRATEGIES[strategy].favours
    if favours == "nothing":
        assert low == middle == high
    elif favours == "high":
        assert low < high
    elif favours == "medium":
        assert middle > max(low, high)
    else:
        assert favours == "ends" and min(low, high) > middle


@PROPERTY
@given(entries, st.sampled_from(NEUTRAL), temperatures, st.data())
def test_neutral_strategies_with_token_counts_weight_by_tokens(items, strategy, r, data):
    """With the token prior, a strategy that favours nothing (`uniform`) makes Σ w_i l_i the token-mean
    loss (Megatron's loss)."""
    losses, valid, good = split_entries(items)
    counts = np.array(
        data.draw(st.lists(st.integers(1, 4096), min_size=len(items), max_size=len(items))), dtype=np.float64
    )
    expected = np.zeros(len(items))
    expected[good] = counts[good] / counts[good].sum()
    np.testing.assert_allclose(
        weights_of(losses, strategy, r, valid=valid, counts=counts.tolist()), expected, rtol=1e-12, atol=1e-15
    )


HOST_READ_EXAMPLES = {
    "item": lambda t: t[0].item(),
    "tolist": lambda t: t.tolist(),
    "__bool__": lambda t: bool(t[0]),
    "__float__": lambda t: float(t[0]),
    "__int__": lambda t: int(t[0]),
    "__index__": lambda t: [0, 1, 2][t[0].long()],
    "numpy": lambda t: t.numpy(),
}


@pytest.mark.parametrize("name", sorted(HOST_READ_EXAMPLES))
def test_host_read_recorder_catches_each_host_read(name):
    t = torch.tensor([1.0, 2.0])
    with HostReadRecorder() as recorder:
        HOST_READ_EXAMPLES[name](t)
    assert recorder.calls == [name]


@pytest.mark.parametrize(
    "example",
    [lambda t: t[0].item(), lambda t: torch.bincount(t.long()), lambda t: t[t > 1], lambda t: torch.nonzero(t)],
    ids=["item", "bincount", "boolean-mask", "nonzero"],
)
def test_syncing_op_recorder_catches_syncing_ops(example):
    with SyncingOpRecorder() as recorder:
        example(torch.tensor([1.0, 2.0]))
    assert recorder.calls


def sync_test_batch():
    losses = torch.tensor([1.0, 2.5, math.nan, 3.0, math.inf, 0.5, -math.inf, 4.0])
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    counts = torch.tensor([10, 20, 0, 5, 7, 9, 3, 11])
    domains = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    return losses, valid, counts, domains


def run_weights_and_statistics(strategy):
    losses, valid, counts, domains = sync_test_batch()
    for token_counts in (None, counts):
        w = compute_sample_weights(losses, strategy=strategy, temperature=0.4, valid=valid, token_counts=token_counts)
        weight_statistics(w, losses, valid & torch.isfinite(losses), domains, num_domains=3)
        weight_statistics(w, losses, valid & torch.isfinite(losses))


@pytest.mark.parametrize("strategy", NAMES)
def test_no_host_read_in_weights_and_statistics(strategy):
    with HostReadRecorder() as recorder:
        run_weights_and_statistics(strategy)
    assert recorder.calls == []


@pytest.mark.parametrize("strategy", NAMES)
def test_no_cuda_syncing_operator_in_weights_and_statistics(strategy):
    with SyncingOpRecorder() as recorder:
        run_weights_and_statistics(strategy)
    assert recorder.calls == []


STAT_WEIGHTS = [0.05, 0.05, 0.10, 0.10, 0.10, 0.10, 0.25, 0.25]


STAT_ENTROPY = -(2 * 0.05 * math.log(0.05) + 4 * 0.10 * math.log(0.10) + 2 * 0.25 * math.log(0.25)) / math.log(8)


def assert_statistics(stats, expected):
    assert set(stats) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(stats[key].numpy(), value, rtol=0, atol=1e-12, err_msg=key)


HAND_WORKED_STATISTICS = {
    "ess": 1 / (8 * 0.17),
    "max_weight": 2.0,
    "entropy": STAT_ENTROPY,
    "invalid_fraction": 0.0,
    "loss_top_quarter": 7.5,
    "loss_bottom_quarter": 1.5,
    "domain_weight_share": [0.3, 0.7],
    "domain_sample_share": [0.5, 0.5],
    "domain_samples": [4, 4],
    "domain_loss_sum": [1 + 2 + 3 + 4, 5 + 6 + 7 + 8],
}


def test_statistics_hand_worked():
    stats = weight_statistics(
        torch.tensor(STAT_WEIGHTS, dtype=torch.float64),
        torch.arange(1.0, 9.0, dtype=torch.float64),
        torch.ones(8, dtype=torch.bool),
        torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
        num_domains=2,
    )
    assert_statistics(
        stats,
        HAND_WORKED_STATISTICS,
    )


def test_statistics_leave_invalid_samples_out():
    """Two extra invalid samples (a NaN loss, a masked one with a stray weight) change
    nothing but invalid_fraction = 2/10, even though their domains and losses are extreme."""
    weights = STAT_WEIGHTS[:3] + [0.0] + STAT_WEIGHTS[3:6] + [0.9] + STAT_WEIGHTS[6:]
    losses = [1.0, 2.0, 3.0, math.nan, 4.0, 5.0, 6.0, 100.0, 7.0, 8.0]
    valid = [True, True, True, False, True, True, True, False, True, True]
    domains = [0, 0, 0, 1, 0, 1, 1, 0, 1, 1]
    stats = weight_statistics(
        torch.tensor(weights, dtype=torch.float64),
        torch.tensor(losses, dtype=torch.float64),
        torch.tensor(valid),
        torch.tensor(domains),
        num_domains=2,
    )
    assert_statistics(
        stats,
        {**HAND_WORKED_STATISTICS, "invalid_fraction": 0.2},
    )


def test_statistics_of_uniform_weights_are_one():
    stats = weight_statistics(
        torch.full((5,), 0.2, dtype=torch.float64), torch.arange(5.0), torch.ones(5, dtype=torch.bool)
    )
    for key in ("ess", "max_weight", "entropy"):
        assert stats[key].item() == pytest.approx(1.0, abs=1e-12), key
    assert "domain_weight_share" not in stats


def test_statistics_with_no_valid_sample_are_finite():
    stats = weight_statistics(
        torch.zeros(3), torch.full((3,), math.nan), torch.zeros(3, dtype=torch.bool), torch.zeros(3), 2
    )
    assert all(torch.isfinite(v).all() for v in stats.values())
    assert stats["invalid_fraction"].item() == 1.0


def sequence(schedule: ReweightSchedule, steps: int) -> list[tuple[str, float]]:
    out = []
    for _ in range(steps):
        out.append(schedule.current())
        schedule.advance()
    return out


def test_uniform_warm_up_then_switch_at_once():
    got = sequence(ReweightSchedule("linupper", 0.4, warmup_steps=3), 5)
    assert got == [("uniform", 1.0)] * 3 + [("linupper", pytest.approx(0.4, rel=1e-12))] * 2


def test_no_warm_up_starts_at_target():
    assert ReweightSchedule("extremes", 0.4).current() == ("extremes", pytest.approx(0.4, rel=1e-12))


def test_warm_up_with_a_temperature():
    got = sequence(ReweightSchedule("extremes", 0.4, warmup_steps=2, warmup_temperature=100.0), 4)
    assert (
        got == [("extremes", pytest.approx(100.0, rel=1e-12))] * 2 + [("extremes", pytest.approx(0.4, rel=1e-12))] * 2
    )


def test_uniform_strategy_is_uniform_at_every_step():
    assert sequence(ReweightSchedule("uniform", 0.4, warmup_steps=2, anneal_steps=3), 6) == [("uniform", 1.0)] * 6


def test_anneal_from_uniform_is_linear_in_inverse_temperature():
    """Target 1/r = 1 over 4 steps after 2 uniform ones: 1/r = 0, 0, .25, .5, .75, 1, 1."""
    schedule = ReweightSchedule("quadratic", 1.0, warmup_steps=2, anneal_steps=4)
    got = sequence(schedule, 7)
    assert got[:2] == [("uniform", 1.0)] * 2
    assert [name for name, _ in got[2:]] == ["quadratic"] * 5
    np.testing.assert_allclose([1 / r for _, r in got[2:]], [0.25, 0.5, 0.75, 1.0, 1.0], rtol=1e-12)


def test_anneal_from_warm_up_temperature_is_linear_in_inverse_temperature():
    """1/r goes from 1/100 to 1/0.5 = 2 in 2 steps: .01, then .01 + (2 − .01)/2, then 2."""
    got = sequence(ReweightSchedule("linupper", 0.5, warmup_steps=1, warmup_temperature=100.0, anneal_steps=2), 4)
    np.testing.assert_allclose([1 / r for _, r in got], [0.01, 0.01 + 1.99 / 2, 2.0, 2.0], rtol=1e-12)


def test_state_dict_round_trip_resumes_the_same_sequence():
    settings_ = dict(strategy="quadratic", temperature=0.4, warmup_steps=2, warmup_temperature=50.0, anneal_steps=3)
    original = ReweightSchedule(**settings_)
    sequence(original, 3)
    state = json.loads(json.dumps(original.state_dict()))  # survives a checkpoint as plain data
    resumed = ReweightSchedule(**settings_)
    resumed.load_state_dict(state)
    assert resumed.step == 3
    assert sequence(resumed, 5) == sequence(original, 5)


def test_changed_schedule_on_resume_warns():
    state = ReweightSchedule("linupper", 0.4, warmup_steps=5).state_dict()
    changed = ReweightSchedule("linupper", 0.2, warmup_steps=5)
    with pytest.warns(UserWarning, match="changed on resume"):
        changed.load_state_dict(state)


def test_unknown_strategy_is_refused_naming_the_choices():
    with pytest.raises(ValueError) as error:
        ReweightSchedule("mid", 1.0)
    assert all(name in str(error.value) for name in NAMES)
    with pytest.raises(ValueError, match="linupper"):
        compute_sample_weights(torch.ones(2), strategy="mid", temperature=1.0)


@pytest.mark.parametrize("r", [0.0, -1.0, math.nan])
def test_non_positive_temperature_is_refused(r):
    with pytest.raises(ValueError, match="> 0"):
        ReweightSchedule("linupper", r)
    with pytest.raises(ValueError, match="> 0"):
        ReweightSchedule("linupper", 1.0, warmup_steps=10, warmup_temperature=r)
    with pytest.raises(ValueError, match="> 0"):
        compute_sample_weights(torch.ones(2), strategy="linupper", temperature=r)


@pytest.mark.parametrize("field", ["warmup_steps", "anneal_steps"])
def test_negative_step_counts_are_refused(field):
    with pytest.raises(ValueError, match=field):
        ReweightSchedule("linupper", 1.0, **{field: -1})
