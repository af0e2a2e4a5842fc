"""Configs that used to end in a traceback or a NaN mid-run, or ran silently wrong: refused
before any process group starts, with one message naming the key and the fix."""

import os

import pytest
from helpers import REPO

from launch import pretrain
from launch.config import ConfigError, load_config, validate


def demo(*overrides: str):
    return load_config(REPO / "configs/demo_cpu.yaml", overrides)


def refusal(*overrides: str) -> str:
    with pytest.raises(ConfigError) as error:
        validate(demo(*overrides), 2)
    return str(error.value)


def run_main(capsys, monkeypatch, *argv: str) -> tuple[int, str]:
    monkeypatch.delenv("RANK", raising=False)  # rank 0 prints the refusal
    code = pretrain.main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("how", [["--dry-run"], ["--run-dir", "unused"]], ids=["dry-run", "train"])
@pytest.mark.parametrize(
    "content, named",
    [
        (None, "is a directory, not a YAML config file: give a file, e.g. configs/demo_cpu.yaml"),
        (
            b"\x89PNG\r\n\x1a\n\x00\xff\xfe",
            "is not a YAML file (not UTF-8 text): give a YAML config file, e.g. configs/demo_cpu.yaml",
        ),
    ],
    ids=["directory", "binary"],
)
def test_a_config_path_that_is_no_yaml_file_is_refused(tmp_path, capsys, monkeypatch, how, content, named):
    path = tmp_path / "config"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    code, err = run_main(capsys, monkeypatch, "--config", str(path), *how)
    assert code == 2
    assert err == f"config error: {path} {named}\n"
    assert not (tmp_path / "unused").exists()


def test_a_seed_beyond_numpy_is_refused():
    assert "train.seed=4294967296 is above 2**32-1" in refusal("train.seed=4294967296")
    assert "choose a seed in [0, 4294967295]" in refusal("train.seed=4294967296")
    validate(demo("train.seed=4294967295"), 2)


@pytest.mark.parametrize(
    "split, named",
    [
        ("0,0,0", "data.split='0,0,0' leaves nothing to train on"),
        ("0,100,0", "data.split='0,100,0' leaves nothing to train on"),
        (
            "100,0,0",
            "data.split='100,0,0' holds out no validation share and data.valid_blend is null:"
            " set data.split='99,1,0' or data.valid_blend",
        ),
        ("99,0,1", "data.split='99,0,1' holds out no validation share"),
    ],
)
def test_a_split_without_training_or_validation_data_is_refused(split, named):
    assert named in refusal(f"data.split={split}", "data.valid_blend=null")


def test_a_split_is_free_when_a_held_out_blend_gives_the_validation_data():
    validate(demo("data.split=100,0,0"), 2)  # the demo config has a data.valid_blend


def test_a_missing_checkpoint_to_load_is_refused_naming_it(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "runs/old/checkpoints/step_100"
    message = refusal(f"checkpoint.load={missing}")
    assert f"checkpoint.load={missing} does not exist: point it at a checkpoint directory" in message
    assert "or set checkpoint.load=null" in message
    (tmp_path / "file").write_text("")
    assert f"checkpoint.load={tmp_path / 'file'} is not a directory" in refusal(f"checkpoint.load={tmp_path / 'file'}")
    validate(demo(f"checkpoint.load={tmp_path}"), 2)
    code, err = run_main(
        capsys, monkeypatch, "--config", "configs/demo_cpu.yaml", "--dry-run", "--set", f"checkpoint.load={missing}"
    )
    assert code == 2 and f"checkpoint.load={missing} does not exist" in err


def test_an_unwritable_cache_dir_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    message = refusal(f"data.cache_dir={tmp_path / 'file' / 'cache'}")
    assert f"data.cache_dir={tmp_path / 'file' / 'cache'}: {tmp_path / 'file'} is a file, not a directory" in message
    assert "set data.cache_dir to a writable directory, or null" in message
    # Even root cannot create files in /proc: the check writes rather than reading permission bits.
    assert "data.cache_dir=/proc/cache: cannot write in /proc" in refusal("data.cache_dir=/proc/cache")
    validate(demo(f"data.cache_dir={tmp_path / 'a/b/cache'}"), 2)
    assert os.listdir(tmp_path) == ["file"]  # the check leaves nothing behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_cache_dir_under_a_read_only_directory_is_refused(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    assert f"cannot write in {tmp_path / 'ro'}" in refusal(f"data.cache_dir={tmp_path / 'ro/cache'}")


def test_negative_data_workers_or_no_prefetch_are_refused():
    assert "data.num_workers=-1 must be >= 0 (0 reads on the training thread), or null" in refusal(
        "data.num_workers=-1"
    )
    assert "data.prefetch=0 must be >= 1" in refusal("data.prefetch=0")


def test_steps_whose_sample_index_would_not_fit_in_memory_are_refused():
    cfg = demo("train.steps=1e9")  # YAML reads 1e9 as a string: a whole number is taken as an int
    assert cfg.train.steps == 1_000_000_000 and isinstance(cfg.train.steps, int)
    message = refusal("train.steps=1e9")
    assert "train.steps=1000000000 needs a sample index of 507 GiB (16,000,000,000 samples" in message
    assert "lower train.steps" in message
    validate(demo("train.steps=1e6"), 2)  # 16M samples, 0.5 GiB


def test_a_reweighting_warm_up_as_long_as_the_run_is_refused():
    message = refusal("reweight.warmup_steps=200")  # train.steps=200 with linupper
    assert message.endswith(
        "reweight.warmup_steps=200 >= train.steps=200: the run would never reweight;"
        " lower reweight.warmup_steps or use reweight.strategy=uniform"
    )
    validate(demo("reweight.warmup_steps=199"), 2)
    validate(demo("reweight.warmup_steps=200", "reweight.strategy=uniform"), 2)
    validate(demo("reweight.warmup_steps=200", "reweight.warmup_temperature=100"), 2)  # reweights in warm-up


@pytest.mark.parametrize("layers", [0, -2])
def test_no_layers_is_refused_as_such(layers):
    message = refusal(f"model.num_layers={layers}")
    assert f"model.num_layers={layers} must be >= 1" in message and "divisible" not in message


def test_values_that_end_in_nan_gradients_are_refused_up_front():
    message = refusal("model.position_embedding=rope", "model.rotary_base=0")
    assert "model.rotary_base=0 must be > 0 with model.position_embedding=rope (10000 is the usual base)" in message
    validate(demo("model.rotary_base=0"), 2)  # learned positions do not use it
    assert "optim.lr=2.0 must be in (0, 1]: lower it" in refusal("optim.lr=2")
    validate(demo("optim.lr=1", "optim.min_lr=0"), 2)
