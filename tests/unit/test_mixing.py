"""Online domain mixing: the per-sample draw, ODM's EXP3 update worked by hand, and the
settings refused before a run starts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import REPO

from launch.config import ConfigError, load_config, validate
from launch.mixing import Exp3Mixer, draw_domains, sample_uniforms


def test_each_sample_draws_its_domain_from_the_mixture_by_its_own_index():
    mixture = np.array([0.5, 0.3, 0.2])
    indices = np.arange(200_000)
    domains = draw_domains(1234, indices, mixture)
    np.testing.assert_allclose(np.bincount(domains, minlength=3) / len(indices), mixture, atol=0.005)
    # A pure function of (seed, index): any chunking of the indices (a step, a rank's slice) draws the same.
    chunks = np.concatenate([draw_domains(1234, part, mixture) for part in np.array_split(indices, 7)])
    np.testing.assert_array_equal(chunks, domains)
    assert not np.array_equal(draw_domains(1235, indices, mixture), domains)  # another seed, another draw
    uniforms = sample_uniforms(1234, indices)
    assert 0 <= uniforms.min() and uniforms.max() < 1
    assert abs(uniforms.mean() - 0.5) < 0.005


def test_a_domain_of_weight_zero_is_never_drawn_and_a_certain_one_always():
    domains = draw_domains(7, np.arange(10_000), np.array([0.0, 1.0, 0.0]))
    assert set(domains.tolist()) == {1}


def test_exp3_update_by_hand():
    """K = 2, prior w = (0.75, 0.25), exploration γ = 0.2 (η = γ/K = 0.1), smoothing α = 0.5."""
    mixer = Exp3Mixer([3.0, 1.0], exploration=0.2, smoothing=0.5)  # the prior is normalised
    # Before any reward: π = (1 − γ) w + γ/K.
    np.testing.assert_allclose(mixer.mixture, [0.8 * 0.75 + 0.1, 0.8 * 0.25 + 0.1])
    # Domain 0 drew 3 samples of mean loss 2, domain 1 none: only domain 0's reward moves,
    # by its importance-weighted loss L/π.
    mixer.update(np.array([6.0, 0.0]), np.array([3.0, 0.0]))
    reward = 0.5 * 0.0 + 0.5 * 2.0 / 0.7
    np.testing.assert_allclose(mixer.rewards, [reward, 0.0])
    exploit = 0.75 * math.exp(0.1 * reward) / (0.75 * math.exp(0.1 * reward) + 0.25)
    np.testing.assert_allclose(mixer.mixture, [0.8 * exploit + 0.1, 0.8 * (1 - exploit) + 0.1])
    # Both drawn: the domain of the higher importance-weighted loss gains share.
    before = mixer.mixture.copy()
    mixer.update(np.array([1.0, 4.0]), np.array([1.0, 1.0]))
    assert mixer.mixture[1] > before[1] and mixer.mixture.sum() == pytest.approx(1.0)


def test_odm_schedule_explores_uniformly_until_t_exceeds_k_ln_k():
    """γ_t = min(1, sqrt(K ln K / t)): with K = 5 the mixture stays uniform for 8 updates."""
    mixer = Exp3Mixer([0.6, 0.1, 0.1, 0.1, 0.1], exploration=None, smoothing=0.9)
    for _ in range(8):
        np.testing.assert_allclose(mixer.mixture, 0.2)
        mixer.update(np.array([5.0, 1.0, 1.0, 1.0, 1.0]), np.ones(5))
    gamma = math.sqrt(5 * math.log(5) / 9)
    assert mixer.mixture.min() >= gamma / 5 - 1e-12
    assert mixer.mixture[0] > 0.2  # its prior and its loss both favour domain 0


def test_the_bandit_resumes_from_its_state_exactly():
    losses, counts = np.array([3.0, 1.0, 2.0]), np.array([2.0, 1.0, 1.0])
    unbroken = Exp3Mixer([1.0, 1.0, 2.0], exploration=0.3, smoothing=0.9)
    stopped = Exp3Mixer([1.0, 1.0, 2.0], exploration=0.3, smoothing=0.9)
    for _ in range(3):
        unbroken.update(losses, counts)
        stopped.update(losses, counts)
    resumed = Exp3Mixer([1.0, 1.0, 2.0], exploration=0.3, smoothing=0.9)
    resumed.load_state_dict(stopped.state_dict())
    for _ in range(2):
        unbroken.update(losses, counts)
        resumed.update(losses, counts)
    assert resumed.mixture.tolist() == unbroken.mixture.tolist()


def _refusal(*overrides: str) -> str:
    with pytest.raises(ConfigError) as error:
        validate(load_config(REPO / "configs/demo_cpu.yaml", overrides), 2)
    return str(error.value)


def test_a_zero_weight_domain_under_odm_is_refused_saying_why():
    weights = "data.weights={boilerplate: 0, code: 1, docs: 1, licenses: 1, prose: 1}"
    message = _refusal("data.mixing=odm", weights)
    assert "data.weights gives boilerplate weight 0 under data.mixing=odm" in message
    assert "explores every domain" in message and "data.mixing=fixed" in message
    validate(load_config(REPO / "configs/demo_cpu.yaml", [weights]), 2)  # fixed leaves it out


@pytest.mark.parametrize(
    "setting, named",
    [
        ("data.mixing_exploration=1.5", "data.mixing_exploration=1.5 must be in [0, 1]"),
        ("data.mixing_update_interval=0", "data.mixing_update_interval=0 must be >= 1"),
        ("data.mixing_smoothing=1.0", "data.mixing_smoothing=1.0 must be in [0, 1)"),
    ],
)
def test_odm_settings_out_of_range_are_refused(setting, named):
    assert named in _refusal("data.mixing=odm", setting)


def test_non_finite_odm_settings_and_unknown_mixings_are_refused():
    with pytest.raises(ConfigError, match=r"data.mixing_exploration: .* is not a finite number"):
        load_config(REPO / "configs/demo_cpu.yaml", ["data.mixing=odm", "data.mixing_exploration=.inf"])
    with pytest.raises(ConfigError, match=r"data.mixing: 'doge' is not one of 'fixed', 'odm'"):
        load_config(REPO / "configs/demo_cpu.yaml", ["data.mixing=doge"])


def test_the_report_draws_each_domains_mixture_over_the_steps(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from launch.tools import report

    saved, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda figure, *a, **k: (saved.append(figure), savefig(figure, *a, **k)))
    run = tmp_path / "odm"
    run.mkdir()
    shares = {"code": 0.5, "prose": 0.5}
    mixtures = [{"code": 0.5, "prose": 0.5}, {"code": 0.6, "prose": 0.4}, {"code": 0.7, "prose": 0.3}]
    train = [
        {"kind": "train", "step": step, "loss": 5.0, "weighted_loss": 5.0, "weight_ess": 1.0, "weight_entropy": 1.0,
         "domain_weight_share": shares, "domain_sample_share": shares, "domain_mixture": mixture}
        for step, mixture in zip((10, 20, 30), mixtures)
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in train))
    (run / "config.yaml").write_text("reweight: {warmup_steps: 0}\n")
    report.plot({"odm": run}, tmp_path / "report.png")
    mixture_ax = saved[0].axes[-1]
    assert "domain mixture" in mixture_ax.get_title()
    lines = {line.get_label(): line.get_ydata().tolist() for line in mixture_ax.get_lines()}
    assert lines == {"code": [0.5, 0.6, 0.7], "prose": [0.5, 0.4, 0.3]}


def test_the_dry_run_and_start_up_summary_describe_the_mixing(demo_dir):
    from launch.dry_run import describe_run

    demo = REPO / "configs/demo_cpu.yaml"
    data = [f"data.blend={demo_dir / 'train.blend.json'}", f"data.tokenizer_model={demo_dir / 'tokenizer.model'}"]
    lines = describe_run(load_config(demo, [*data, "data.mixing=odm", "data.mixing_update_interval=5"]), 2)
    (mixing,) = [line for line in lines if line.startswith("data mixing:")]
    assert "odm (EXP3 over domains" in mixing and "every 5 steps" in mixing and "sqrt(K ln K / t)" in mixing
    assert any(line.endswith("(the starting point of data.mixing)") for line in lines)
    assert "data mixing: fixed" in "\n".join(describe_run(load_config(demo), 2))


def test_resuming_with_another_mixing_is_a_changed_experiment():
    from launch.config import experiment_changes, to_dict

    demo = REPO / "configs/demo_cpu.yaml"
    saved = to_dict(load_config(demo))
    changes = experiment_changes(saved, load_config(demo, ["data.mixing=odm"]), saved_dp=2, dp=2)
    assert changes == ["data.mixing: 'fixed' -> 'odm'"]
