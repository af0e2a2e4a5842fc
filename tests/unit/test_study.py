"""`python -m launch.tools.study` without training: arms, the t-interval, the summary's numbers,
resuming, refusals and the Slurm array."""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers.e2e import REPO

from launch.config import load_config, to_dict
from launch.tools import stats
from launch.tools.study.arms import Arm, parse_arm
from launch.tools.study.cli import main, parse_args
from launch.tools.study.plan import plan, pretrain_args

CONFIG = str(REPO / "configs" / "demo_cpu.yaml")


NATURAL = {"alpha": 0.4, "beta": 0.24, "gamma": 0.16}  # the fabricated train blend's token shares


TRAIN_ONLY = {"delta": 0.2}  # a training domain without held-out data


SHORT = ["train.steps=8", "train.log_interval=2", "reweight.warmup_steps=3", "optim.warmup_steps=2"]


@pytest.mark.parametrize(
    "text, name, settings",
    [
        ("uniform", "uniform", ("reweight.strategy=uniform",)),
        ("linupper:0.5", "linupper-r0.5", ("reweight.strategy=linupper", "reweight.temperature=0.5")),
        (
            "boilerplate-down=data.weights={boilerplate: 0.25, code: 1, docs: 1}",
            "boilerplate-down",
            ("data.weights={boilerplate: 0.25, code: 1, docs: 1}",),
        ),
        (
            "lin-r0.2=reweight.strategy=linupper, reweight.temperature=0.2",
            "lin-r0.2",
            ("reweight.strategy=linupper", "reweight.temperature=0.2"),
        ),
        ("q=data.prefixes=['a,b', c],train.steps=3", "q", ("data.prefixes=['a,b', c]", "train.steps=3")),
    ],
)
def test_arms_parse_to_a_name_and_settings(text, name, settings):
    assert parse_arm(text) == Arm(name, settings)


@pytest.mark.parametrize(
    "text, message",
    [
        ("x=foo", "'foo' is not KEY=VALUE"),
        ("x=steps=3", "'steps=3' is not KEY=VALUE with a dotted key"),
        ("linupper:abc", "temperature 'abc' is not a number"),
        ("a/b=train.steps=3", "the name 'a/b' must be"),
        (":0.5", "expected STRATEGY[:TEMPERATURE]"),
    ],
)
def test_malformed_arms_are_refused_with_the_syntax(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_arm(text)


@pytest.mark.parametrize(
    "arms, message",
    [
        (["uniform", "uniform"], "arm names must differ"),
        (["uniform"], "at least two arms"),
        (["uniform", "x=foo"], "is not KEY=VALUE"),
    ],
)
def test_command_line_refuses_unusable_arm_lists(arms, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([arg for arm in arms for arg in ("--arm", arm)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_default_arms_are_uniform_then_linupper():
    assert [a.name for a in parse_args([]).arms] == ["uniform", "linupper-r0.5"]


@pytest.mark.parametrize(
    "df, expected",
    [
        (1, 12.706204736174707),
        (2, 4.302652729911275),
        (4, 2.7764451051977987),
        (9, 2.2621571627409915),
        (30, 2.0422724563012373),
    ],
)
def test_t_quantile_matches_tables(df, expected):
    assert stats.t_quantile(0.975, df) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995, 0.9999])
def test_t_quantile_matches_closed_forms(p):
    assert stats.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
    assert stats.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)
    alpha = 4 * p * (1 - p)
    q = math.cos(math.acos(math.sqrt(alpha)) / 3) / math.sqrt(alpha)
    assert stats.t_quantile(p, 4) == pytest.approx(2 * math.sqrt(q - 1), rel=1e-9)
    assert stats.t_quantile(1 - p, 4) == -stats.t_quantile(p, 4)


def test_t_quantile_tends_to_the_normal_one():
    assert stats.t_quantile(0.975, 1e7) == pytest.approx(1.959963984540054, rel=1e-6)


def test_interval_is_mean_plus_minus_t_times_standard_error():
    mean, (low, high) = stats.mean_and_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)  # sd = sqrt(2.5), df = 4
    assert (mean, low, high) == pytest.approx((3.0, 3.0 - half, 3.0 + half), rel=1e-9)
    assert stats.mean_and_interval([0.25]) == (0.25, None)


@pytest.fixture
def data_dir(tmp_path):
    """A data_prep-shaped folder: blend files, empty datasets, a placeholder tokenizer."""
    folder = tmp_path / "data"
    folder.mkdir()
    for split, shares in (("train", {**NATURAL, **TRAIN_ONLY}), ("valid", NATURAL)):
        domains = {d: {"prefix": f"{split}_{d}", "documents": 1, "tokens": 1, "weight": w} for d, w in shares.items()}
        (folder / f"{split}.blend.json").write_text(json.dumps({"domains": domains}))
        for d in shares:
            for suffix in (".bin", ".idx"):
                (folder / f"{split}_{d}{suffix}").touch()
    (folder / "tokenizer.model").touch()
    return folder


def study_args(data_dir, out, *extra):
    return ["--config", CONFIG, "--data", str(data_dir), "--out", str(out), "--set", *SHORT, *extra]


def fake_run(run_dir, settings, rng, finished=True):
    """What launch.pretrain leaves: config.yaml and metrics.jsonl (train rows every 2 steps)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(load_config(CONFIG, settings))))
    rows = []
    for step in range(2, 9 if finished else 5, 2):
        weight = {d: rng.random() for d in NATURAL}
        sample = {d: rng.random() for d in NATURAL}
        rows.append(
            {
                "kind": "train", "step": step, "loss": rng.random(), "weight_ess": rng.random(),
                "domain_weight_share": {d: v / sum(weight.values()) for d, v in weight.items()},
                "domain_sample_share": {d: v / sum(sample.values()) for d, v in sample.items()},
            }
        )  # fmt: skip
        if step % 4 == 0:
            losses = {d: 3 + rng.random() for d in NATURAL}
            rows.append({"kind": "valid", "step": step, "valid_loss": 0.0, "valid_loss_per_domain": losses})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def no_subprocess(*args, **kwargs):
    raise AssertionError(f"no run should start, got {args}")


def planned(data_dir, out, arms, seeds):
    args = parse_args(study_args(data_dir, out, *(a for arm in arms for a in ("--arm", arm)), "--seeds", str(seeds)))
    return plan(args.config, args.arms, list(range(1, seeds + 1)), args.out, args.common, args.nproc)


def test_summary_is_recomputable_from_the_runs_own_files(tmp_path, data_dir, monkeypatch):
    arms, seeds = ["uniform", "linupper:0.5", "quadratic:1.0"], 3
    rng = random.Random(0)
    runs = planned(data_dir, tmp_path / "study", arms, seeds)
    rows = {(r.arm, r.seed): fake_run(r.run_dir, r.settings, rng) for r in runs}
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    argv = study_args(data_dir, tmp_path / "study", "--seeds", str(seeds), *(a for arm in arms for a in ("--arm", arm)))
    assert main(argv) == 0
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())

    natural = np.array(list(NATURAL.values())) / sum(NATURAL.values())  # renormalised without delta
    t = 4.302652729911275  # df = 2
    names = ["uniform", "linupper-r0.5", "quadratic-r1.0"]

    def final(arm):  # seeds x domains, from the last valid row
        return np.array(
            [
                [[r for r in rows[arm, s] if r["kind"] == "valid"][-1]["valid_loss_per_domain"][d] for d in NATURAL]
                for s in (1, 2, 3)
            ]
        )

    assert summary["baseline"] == "uniform" and summary["seeds"] == [1, 2, 3]
    assert summary["natural_weights"]["weights"] == pytest.approx(dict(zip(NATURAL, natural)))
    for arm, entry in zip(names, summary["arms"]):
        assert entry["name"] == arm
        losses, base = final(arm), final("uniform")
        for column, d in enumerate(NATURAL):
            assert entry["held_out"][d]["mean"] == pytest.approx(losses[:, column].mean())
        mixtures = [(losses @ natural, base @ natural)] + [(losses[:, c], base[:, c]) for c in range(3)]
        got = [entry["natural_mixture"]] + [entry["held_out"][d] for d in NATURAL]
        for (mine, theirs), result in zip(mixtures, got):
            assert result["mean"] == pytest.approx(mine.mean())
            if arm == "uniform":
                assert result["diff_mean"] is None and result["diff_ci95"] is None
                continue
            diff = mine - theirs
            half = t * diff.std(ddof=1) / math.sqrt(3)
            assert result["diff_mean"] == pytest.approx(diff.mean())
            assert result["diff_ci95"] == pytest.approx([diff.mean() - half, diff.mean() + half])
        # warm-up 3 steps: the rows at 2 and 4 (covering steps 3-4) are left out, 6 and 8 count
        late = {s: [r for r in rows[arm, s] if r["kind"] == "train" and r["step"] >= 6] for s in (1, 2, 3)}
        assert entry["weights"]["rows_after_warmup"] == [2, 2, 2]
        ess = np.mean([np.mean([r["weight_ess"] for r in late[s]]) for s in late])
        assert entry["weights"]["ess"]["mean"] == pytest.approx(ess)
        for key in ("domain_weight_share", "domain_sample_share"):
            for d in NATURAL:
                share = np.mean([np.mean([r[key][d] for r in late[s]]) for s in late])
                assert entry["weights"][key][d] == pytest.approx(share)
    table = (tmp_path / "study" / "summary.md").read_text()
    linupper = summary["arms"][1]["natural_mixture"]
    low, high = linupper["diff_ci95"]
    assert f"| natural mixture | {summary['arms'][0]['natural_mixture']['mean']:.4f} |" in table
    assert f"{linupper['diff_mean']:+.4f} [{low:+.4f}, {high:+.4f}]" in table
    assert (tmp_path / "study" / "summary.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "study").iterdir() if p.is_file()) == [
        "summary.json",
        "summary.md",
        "summary.png",
    ]


def test_finished_runs_are_reused_and_unfinished_ones_resumed_in_their_folder(tmp_path, data_dir, monkeypatch):
    runs = planned(data_dir, tmp_path / "study", ["uniform", "linupper:0.5"], 2)
    rng = random.Random(1)
    fake_run(runs[0].run_dir, runs[0].settings, rng)  # uniform seed 1: finished
    fake_run(runs[1].run_dir, runs[1].settings, rng, finished=False)  # linupper seed 1: stopped at step 4
    started = []

    def pretrain(command, **kwargs):
        started.append(command)
        run_dir = command[command.index("--run-dir") + 1]
        settings = command[command.index("--set") + 1 :]
        fake_run(Path(run_dir), settings, rng)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", pretrain)
    argv = study_args(data_dir, tmp_path / "study", "--seeds", "2", "--arm", "uniform", "--arm", "linupper:0.5")
    assert main(argv) == 0
    assert [c[c.index("--run-dir") + 1] for c in started] == [str(r.run_dir) for r in runs[1:]]
    first = started[0]
    assert first[:5] == [sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc-per-node=2"]
    assert first[5:9] == ["-m", "launch.pretrain", "--config", CONFIG]
    assert first[-3:] == ["reweight.strategy=linupper", "reweight.temperature=0.5", "train.seed=1"]
    assert (tmp_path / "study" / "summary.json").is_file()


def test_a_failed_run_stops_the_study_and_says_how_to_go_on(tmp_path, data_dir, monkeypatch, capsys):
    started = []

    def failing(command, stdout, **kwargs):
        started.append(command)
        stdout.write("Traceback: something broke\n")
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(subprocess, "run", failing)
    assert main(study_args(data_dir, tmp_path / "study", "--seeds", "2")) == 1
    err = capsys.readouterr().err
    assert len(started) == 1 and "something broke" in err and "run the same command again" in err
    assert not (tmp_path / "study" / "summary.json").exists()


def test_a_run_folder_trained_with_other_settings_is_refused(tmp_path, data_dir, monkeypatch, capsys):
    runs = planned(data_dir, tmp_path / "study", ["uniform", "linupper:0.5"], 1)
    fake_run(runs[0].run_dir, [*runs[0].settings, "train.steps=16"], random.Random(2))
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert main(study_args(data_dir, tmp_path / "study", "--seeds", "1")) == 2
    assert "train.steps: 16 -> 8" in capsys.readouterr().err


def test_a_torn_last_metrics_line_is_left_out_and_a_broken_earlier_one_refused(tmp_path, data_dir, monkeypatch, capsys):
    runs = planned(data_dir, tmp_path / "study", ["uniform", "linupper:0.5"], 1)
    rng = random.Random(4)
    for run in runs:
        fake_run(run.run_dir, run.settings, rng)
    metrics = runs[1].run_dir / "metrics.jsonl"
    with metrics.open("a") as stream:
        stream.write('{"kind": "tra')  # a write cut short by a kill
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    argv = study_args(data_dir, tmp_path / "study", "--seeds", "1")
    assert main(argv) == 0  # both runs finished, summarised
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], lines[1][:10], *lines[2:]]))
    assert main(argv) == 2
    assert f"{metrics}:2 is not a JSON row; repair or remove that line" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arm, message",
    [
        ("nonsense", "arm nonsense: reweight.strategy: 'nonsense' is not one of"),
        ("s=train.seed=3", "arm s sets train.seed"),
    ],
)
def test_arms_that_cannot_run_are_refused_before_any_run(arm, message, tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert main(study_args(data_dir, tmp_path / "study", "--arm", "uniform", "--arm", arm)) == 2
    assert message in capsys.readouterr().err


def test_missing_data_points_to_the_demo_corpus(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert main(study_args(tmp_path / "nowhere", tmp_path / "study")) == 2
    assert "make demo-data" in capsys.readouterr().err


def test_slurm_array_runs_each_unfinished_run_with_its_exact_arguments(tmp_path, data_dir, monkeypatch):
    weights = "boilerplate-down=data.weights={alpha: 0.25, beta: 1, gamma: 1, delta: 1}"
    runs = planned(data_dir, tmp_path / "study", ["uniform", weights], 2)
    fake_run(runs[0].run_dir, runs[0].settings, random.Random(3))
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    argv = study_args(
        data_dir, tmp_path / "study", "--seeds", "2", "--arm", "uniform", "--arm", weights, "--nproc", "4", "--slurm"
    )
    assert main(argv) == 0
    monkeypatch.undo()  # subprocess again, to run the script
    script = tmp_path / "study" / "study.sbatch"
    assert "#SBATCH --array=0-2" in script.read_text() and "#SBATCH --gpus-per-node=4" in script.read_text()
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    (fake_bin / "srun").chmod(0o755)
    for task, run in enumerate(runs[1:]):
        env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": str(task)}
        env["SLURM_SUBMIT_DIR"] = str(REPO)  # the script sources launch/slurm/step.sh from where it was submitted
        result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=True)
        args = result.stdout.splitlines()
        start = args.index("launch.torchrun")
        expected = ["--standalone", "--nproc-per-node", "4", *pretrain_args(CONFIG, run)]
        assert args[start + 1 :] == expected
    result = subprocess.run(
        ["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": "3"}, capture_output=True, text=True
    )
    assert result.returncode == 1 and "no run for array task 3" in result.stderr
    assert shlex.quote(runs[1].settings[-2]) in script.read_text()


def test_held_out_slices_of_a_training_domain_stay_out_of_the_natural_mixture(data_dir):
    """The web demo's held-out `web-informative` has no token share of its own in the train blend."""
    from launch.config import ConfigError
    from launch.tools.study.summary import natural_weights

    blend = str(data_dir / "train.blend.json")
    assert natural_weights(blend, ["alpha", "alpha-slice"]) == {"alpha": 1.0}
    with pytest.raises(ConfigError, match="none of the held-out domains"):
        natural_weights(blend, ["alpha-slice"])


def test_an_arm_says_how_it_weighs_and_mixes():
    from launch.config import load_config
    from launch.tools.study.cli import describe

    demo = REPO / "configs/demo_cpu.yaml"
    assert describe(load_config(demo)) == "linupper r=0.5 after 20 uniform steps; natural mixture; 200 steps"
    per_document = describe(load_config(demo, ["reweight.unit=document"]))
    assert per_document.startswith("linupper r=0.5 after 20 uniform steps, per document segment (at most 16 a sample)")
    assert describe(load_config(demo, ["data.mixing=odm"])).endswith("; odm mixing from the natural mixture; 200 steps")
