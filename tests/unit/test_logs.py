"""Logs a cluster user can read, in one process: the noise filter, timestamps, progress lines in
non-terminal logs, and Weights & Biases refused with the install command when it is missing."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap

from helpers.e2e import REPO
from helpers.logs import NOISE, NOISY_LOG_LINES, NOISY_WARNINGS, STAMP, USER_ENV

from launch import quiet


def test_listed_noise_is_silenced_and_everything_else_still_shows():
    script = textwrap.dedent(
        f"""
        import builtins, logging, warnings
        from launch import quiet
        quiet.install()
        logging.basicConfig(format="%(message)s")
        for category, message in {[(c.__name__, m) for c, m in NOISY_WARNINGS]!r}:
            warnings.warn(message, getattr(builtins, category))
        for name, message in {NOISY_LOG_LINES!r}:
            logging.getLogger(name).warning(message)
        warnings.warn("x")
        warnings.warn("Apex is not installed. Falling back to Torch Norm, and something else")
        logging.getLogger("megatron.core.rerun_state_machine").warning("a real rerun problem")
        logging.getLogger("DeepSpeed").warning("a real DeepSpeed problem")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, env=USER_ENV)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    for message in NOISE:
        assert not [line for line in lines if line.endswith(message)], message
    assert "UserWarning: x\n" in result.stderr
    assert "and something else" in result.stderr  # a message is matched whole, not by its start
    assert "a real rerun problem" in result.stderr and "a real DeepSpeed problem" in result.stderr


def test_every_entry_says_why_and_silences_one_observed_message():
    entries = [e.message for e in quiet.WARNINGS] + [e.message for e in quiet.LOG_RECORDS]
    assert all(e.why for e in quiet.WARNINGS + quiet.LOG_RECORDS)
    for pattern in entries:  # no entry is dead weight
        assert any(re.fullmatch(pattern, message) for message in NOISE), pattern


def test_console_lines_carry_wall_clock_time():
    from launch.console import stamp

    assert stamp("a\nb", now=0).split("\n")[1].endswith(" b")
    assert re.fullmatch(f"{STAMP}a\n{STAMP}b", stamp("a\nb"))


def test_wandb_enabled_but_missing_is_refused_with_the_install_command(tmp_path, demo_dir, monkeypatch, capsys):
    from launch import pretrain

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.delenv("RANK", raising=False)
    code = pretrain.main(["--config", "configs/demo_cpu.yaml", "--run-dir", str(tmp_path),
                          "--set", "logging.wandb=true", f"data.blend={demo_dir / 'train.blend.json'}",
                          f"data.valid_blend={demo_dir / 'valid.blend.json'}",
                          f"data.tokenizer_model={demo_dir / 'tokenizer.model'}"])  # fmt: skip
    assert code == 2
    assert "pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "config.yaml").exists()


def test_progress_is_printed_as_plain_lines_when_stderr_is_not_a_terminal(tmp_path, demo_dir):
    for command in (
        ["tokenize", "--input", str(demo_dir / "valid.jsonl"), "--tokenizer-model", str(demo_dir / "tokenizer.model"),
         "--output-prefix", str(tmp_path / "valid"), "--workers", "1"],
        ["train-tokenizer", "--input", str(demo_dir / "valid.jsonl"), "--vocab-size", "600",
         "--output-prefix", str(tmp_path / "tok")],
    ):  # fmt: skip
        env = {**USER_ENV, "DATA_PREP_PROGRESS_SECONDS": "0"}
        result = subprocess.run(
            [sys.executable, "-m", "data_prep", *command], cwd=REPO, capture_output=True, text=True, env=env
        )
        assert result.returncode == 0, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith(("tokenizing: ", "sampling: "))]
        assert lines, result.stderr
        assert re.fullmatch(r"\w+: \d+% \([\d.]+ k?B of [\d.]+ k?B\).*", lines[0]), lines[0]
        assert re.fullmatch(r"\w+: done, [\d.]+ k?B in \d+ s.*", lines[-1]), lines[-1]
        assert "\r" not in result.stderr  # no bar redrawn in a log file
        if command[0] == "tokenize":
            assert "tokens/s" in lines[0]


def test_progress_stays_quiet_for_short_jobs_at_the_default_interval(tmp_path, demo_dir):
    command = ["tokenize", "--input", str(demo_dir / "valid.jsonl"),
               "--tokenizer-model", str(demo_dir / "tokenizer.model"),
               "--output-prefix", str(tmp_path / "valid"), "--workers", "1"]  # fmt: skip
    env = {k: v for k, v in USER_ENV.items() if k != "DATA_PREP_PROGRESS_SECONDS"}
    result = subprocess.run(
        [sys.executable, "-m", "data_prep", *command], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0 and "tokenizing:" not in result.stderr, result.stderr
