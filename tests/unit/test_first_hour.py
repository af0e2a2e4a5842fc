"""What a new user meets first: dry-run verdicts, refusals that name the way out, the help texts."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import REPO
from matplotlib.figure import Figure

from data_prep import cli as data_prep_cli
from launch import dry_run, pretrain
from launch.config import load_config, validate
from launch.tools import bench, evaluate, export, report
from launch.tools.study import cli as study_cli
from launch.tools.study.arms import parse_arm
from launch.tools.study.markdown import markdown


def dry_run_main(capsys, monkeypatch, *argv: str) -> tuple[int, str, str]:
    monkeypatch.chdir(REPO)
    code = pretrain.main(["--dry-run", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_a_dry_run_without_data_gives_the_layout_verdict_and_exits_0(capsys, monkeypatch):
    code, out, _ = dry_run_main(
        capsys, monkeypatch, "--config", "configs/gpt2-124m.yaml", "--world-size", "4", "--no-data"
    )
    assert code == 0
    assert "layout: OK for 4 processes" in out
    assert out.rstrip().endswith("data: not checked (--no-data)")


def test_missing_data_is_reported_apart_from_a_layout_that_holds(capsys, monkeypatch):
    code, out, _ = dry_run_main(capsys, monkeypatch, "--config", "configs/gpt2-124m.yaml", "--world-size", "4")
    assert code == 1
    verdict = out.split("layout: OK for 4 processes", 1)[1]
    assert "data problems: 3 (--no-data checks the layout alone)" in verdict


def test_a_layout_that_cannot_run_is_refused_by_a_dry_run_without_data(capsys, monkeypatch):
    code, out, err = dry_run_main(
        capsys, monkeypatch, "--config", "configs/demo_cpu.yaml", "--world-size", "3", "--no-data"
    )
    assert code == 2 and not out
    assert "train.global_batch_size=16 is not divisible by micro_batch_size*DP = 4*3 = 12" in err


@pytest.mark.parametrize(
    "config, assumed",
    [
        ("configs/paper/gpt2-124m-uniform.yaml", "fp32; bytes per parameter: weights 4, gradients 4"),
        (
            "configs/gpt2-124m.yaml",
            "bf16 (precision auto: bf16 on a GPU, fp32 on a CPU); bytes per parameter: weights 2",
        ),
    ],
)
def test_the_memory_assumptions_are_this_configs(capsys, monkeypatch, config, assumed):
    _, out, _ = dry_run_main(capsys, monkeypatch, "--config", config, "--world-size", "4", "--no-data")
    assert f"assumptions: {assumed}" in out
    fp32 = "fp32;" in assumed
    assert ("bytes in fp32" in out) == fp32 and ("bytes in bf16" in out) != fp32


def test_a_sharded_optimizer_is_named_in_the_assumptions(capsys, monkeypatch):
    argv = ["--config", "configs/gpt2-124m.yaml", "--world-size", "4", "--no-data"]
    _, out, _ = dry_run_main(capsys, monkeypatch, *argv, "--set", "parallel.distributed_optimizer=true")
    assert "optimizer 3 (fp32 master, Adam m, v), optimizer sharded over DP 4;" in out


@pytest.mark.parametrize("gib, verdict", [(140, "memory: OK, ~38.57 GiB per GPU, 28% of the 140.00 GiB"), (40, None)])
def test_on_a_gpu_node_the_dry_run_checks_the_memory_estimate_against_the_gpu(capsys, monkeypatch, gib, verdict):
    gpu = SimpleNamespace(name="NVIDIA H200", total_memory=gib * 2**30)
    monkeypatch.setattr(dry_run, "on_gpu", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpu)
    code, out, _ = dry_run_main(
        capsys, monkeypatch, "--config", "configs/llama-7b.yaml", "--world-size", "64", "--no-data"
    )
    if verdict:
        assert code == 0 and f"{verdict} of this machine's NVIDIA H200" in out
    else:  # 96 %: the estimate leaves out the CUDA context, NCCL's buffers, fragmentation
        assert code == 1
        assert (
            "memory: ~38.57 GiB per GPU is 96% of the 40.00 GiB of this machine's NVIDIA H200,"
            " over the 90% an estimate may take: set model.recompute_granularity=full"
        ) in out


def test_on_a_cpu_the_memory_is_not_checked(capsys, monkeypatch):
    monkeypatch.setattr(dry_run, "on_gpu", lambda: False)
    _, out, _ = dry_run_main(
        capsys, monkeypatch, "--config", "configs/gpt2-124m.yaml", "--world-size", "4", "--no-data"
    )
    assert "memory: not checked, no GPU here (--gpu-memory-gib G checks it against a GPU of G GiB)" in out


NO_RECOMPUTATION = (
    "model.recompute_granularity=null",
    "model.recompute_method=null",
    "model.recompute_num_layers=null",
)


@pytest.mark.parametrize("gib, code", [(80, 1), (141, 0)])
def test_a_login_node_checks_the_memory_against_the_gpu_it_names(capsys, monkeypatch, gib, code):
    monkeypatch.setattr(dry_run, "on_gpu", lambda: False)
    config = "configs/paper/llama-7b-uniform.yaml"
    argv = ["--config", config, "--world-size", "64", "--no-data", "--gpu-memory-gib", str(gib)]
    # Without its recomputation the preset takes ~76 GiB: too much for 80, not for 141.
    returned, out, _ = dry_run_main(capsys, monkeypatch, *argv, "--set", *NO_RECOMPUTATION)
    assert returned == code and f"of {gib} GiB of GPU memory (--gpu-memory-gib)" in out


def test_under_torchrun_only_rank_0_prints_the_dry_run_main(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, out, _ = dry_run_main(capsys, monkeypatch, "--config", "configs/gpt2-124m.yaml")
    assert (code, out) == (2, "")  # 2: launch.torchrun neither restarts it nor explains it again
    monkeypatch.setenv("RANK", "0")
    code, out, _ = dry_run_main(capsys, monkeypatch, "--config", "configs/gpt2-124m.yaml", "--no-data")
    assert code == 0 and out.count("layout: OK for 2 processes") == 1


def test_a_missing_config_names_the_configs_there_are(capsys, monkeypatch):
    code, _, err = dry_run_main(capsys, monkeypatch, "--config", "configs/gpt2.yaml")
    assert code == 2
    assert "config file not found:" in err and "configs/gpt2-124m.yaml, configs/gpt2-24x768.yaml" in err
    presets = len(list((REPO / "configs/paper").glob("*.yaml")))
    assert f"and {presets} reference presets in configs/paper/" in err


def test_no_data_belongs_to_a_dry_run(capsys):
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--config", "c.yaml", "--run-dir", "r", "--no-data"])
    assert "--no-data goes with --dry-run" in capsys.readouterr().err


# --------------------------------------------------------------------------- the study


def test_a_set_typo_in_a_study_is_named_as_set(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    assert study_cli.main(["--set", "train.step=3", "--out", str(tmp_path / "study")]) == 2
    assert capsys.readouterr().err.startswith("config error: --set: unknown key 'train.step'")


def test_a_study_of_fewer_than_3_seeds_is_cautioned_before_its_runs(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    for name in ("train.blend.json", "valid.blend.json", "tokenizer.model"):  # checked to exist, not read
        (tmp_path / name).touch()
    monkeypatch.setattr(study_cli, "run_all", lambda *args: False)  # stop where training would start
    study_cli.main(["--seeds", "2", "--out", str(tmp_path / "study"), "--data", str(tmp_path)])
    assert "caution: 2 seed(s) give intervals that can look tight by chance" in capsys.readouterr().out


def test_the_studys_mixture_arms_in_its_help_and_the_readme_train_uniform_weights():
    texts = study_cli.EXAMPLES + (REPO / "README.md").read_text()
    arms = [parse_arm(text) for text in re.findall(r"'([\w.+-]+=[^']*data\.weights=[^']*)'", texts)]
    assert len(arms) >= 4
    assert all("reweight.strategy=uniform" in arm.settings for arm in arms), arms


def summary_of(seeds: list[int]) -> dict:
    """The least summary `markdown` reads: one domain, a baseline and one arm."""
    entry = {"mean": 3.0, "diff_mean": 0.1, "diff_ci95": [0.05, 0.15] if len(seeds) > 1 else None}
    weights = {"ess": {"mean": 1.0}, "domain_weight_share": {}, "domain_sample_share": {}}
    arm = {
        "name": "linupper",
        "settings": [],
        "held_out": {"code": entry},
        "natural_mixture": entry,
        "weights": weights,
    }
    base = {**arm, "name": "uniform"}
    return {
        "arms": [base, arm],
        "baseline": "uniform",
        "seeds": seeds,
        "confidence": 0.95,
        "config": "configs/demo_cpu.yaml",
        "natural_weights": {"weights": {"code": 1.0}},
    }


@pytest.mark.parametrize(
    "seeds, stated, caution",
    [
        ([1, 2, 3], "n = 3 paired seeds [1, 2, 3]", None),
        ([1, 2], "n = 2 paired seeds [1, 2]", "Caution: 2 seeds give 1 degree of freedom"),
        ([1], "n = 1 paired seeds [1]", "Caution: one seed gives no interval"),
    ],
)
def test_the_study_summary_states_n_and_degrees_of_freedom_and_warns_below_3_seeds(seeds, stated, caution):
    table = markdown(summary_of(seeds))
    assert stated in table
    n = len(seeds)
    interval = {
        3: "[95% Student t-interval, n − 1 = 2 degrees of freedom]",
        2: "[95% Student t-interval, n − 1 = 1 degree of freedom]",
        1: "(one seed: no interval)",
    }[n]
    assert f"Δ = arm − uniform per seed, mean {interval}; lower is better." in table
    assert ("Caution" in table) == (caution is not None) and (caution is None or caution in table)


# --------------------------------------------------------------------------- examples that cannot drift


def example_commands(text: str) -> list[list[str]]:
    """Every command line of a text that runs `python -m MODULE ...`, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    commands = [re.match(r"\s*(\w+=\S+\s+)*python -m (.*)", line) for line in joined.splitlines()]
    return [shlex.split(command[2], comments=True) for command in commands if command]


def readme_and_help_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    checks = re.findall(r"`(python -m launch\.pretrain --config [^`]*)`", (REPO / "README.md").read_text())
    helps = [pretrain._EXAMPLES, study_cli.EXAMPLES, export.EXAMPLES, evaluate.EXAMPLES, bench.EXAMPLE]
    helps += [
        data_prep_cli.EPILOG,
        data_prep_cli.TRAIN_EPILOG,
        data_prep_cli.TOKENIZE_EPILOG,
        data_prep_cli.MERGE_EPILOG,
        data_prep_cli.INSPECT_EPILOG,
    ]
    return [command for text in [*blocks, *checks, *helps] for command in example_commands(text)]


def check_example(module: str, argv: list[str], world_size: int = 1) -> None:
    """Run the example as far as it goes without data or training: its dry-run form. (Export,
    evaluate and report need a trained run; tests/e2e runs them.)"""
    if module == "launch.torchrun":
        nproc = re.search(r"--nproc-per-node[= ](\d+)", " ".join(argv))[1]
        inner = argv.index("-m")
        return check_example(argv[inner + 1], argv[inner + 2 :], int(nproc))
    if module == "launch.pretrain":
        args = pretrain.parse_args(argv)
        world_size = args.world_size if "--world-size" in argv else world_size
        dry = ["--config", args.config, "--dry-run", "--no-data", "--world-size", str(world_size)]
        assert pretrain.main([*dry, "--set", *args.overrides] if args.overrides else dry) == 0, argv
    elif module == "launch.tools.study":
        args = study_cli.parse_args(argv)
        for arm in args.arms:
            validate(load_config(args.config, [*args.common, *arm.settings]), args.nproc)
    elif module == "launch.tools.bench":
        args = bench.parse_args(argv)
        validate(load_config(args.config, args.overrides), world_size)
    elif module == "data_prep":
        data_prep_cli.build_parser().parse_args(argv)


def test_every_example_of_the_readme_and_of_help_runs_in_its_dry_run_form(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    commands = readme_and_help_commands()
    modules = {argv[0] for argv in commands} | {argv[argv.index("-m") + 1] for argv in commands if "-m" in argv}
    assert {"launch.torchrun", "launch.pretrain", "launch.tools.study", "launch.tools.bench", "data_prep"} <= modules
    for module, *argv in commands:
        check_example(module, argv)
    assert "config error" not in capsys.readouterr().err


# --------------------------------------------------------------------------- the report's figure


def uniform_run(run_dir: Path, warmup_steps: int = 20) -> Path:
    """Train rows every 10 steps up to 40 with uniform weights, one evaluation, the saved config."""
    run_dir.mkdir(parents=True)
    shares = {"code": 0.75, "prose": 0.25}
    train = [
        {"kind": "train", "step": step, "loss": 5.0 - step / 100, "weighted_loss": 5.0 - step / 100,
         "weight_ess": 1.0, "weight_entropy": 1.0, "domain_weight_share": shares, "domain_sample_share": shares}
        for step in (10, 20, 30, 40)
    ]  # fmt: skip
    valid = {"kind": "valid", "step": 40, "valid_loss": 4.5, "valid_loss_per_domain": {"code": 4.0, "prose": 5.0}}
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [*train, valid]))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"reweight": {"warmup_steps": warmup_steps}}))
    return run_dir


def test_the_report_figure_labels_its_axes_names_its_window_and_draws_coinciding_series_once(tmp_path, monkeypatch):
    saved, savefig = [], Figure.savefig

    def keep(figure, *args, **kwargs):  # the figure, to read back what it shows
        saved.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    report.plot({"uniform": uniform_run(tmp_path / "uniform")}, tmp_path / "report.png")
    loss, valid, ess, share = saved[0].axes
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in saved[0].axes)
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["uniform: LM loss = weighted loss"]
    assert [t.get_text() for t in ess.get_legend().get_texts()] == ["uniform: ESS = normalised entropy"]
    assert "mean over steps 21-40, after the warm-up" in share.get_title()
