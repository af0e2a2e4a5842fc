"""The run configuration: loading, overrides, validation, blends and the dry-run report."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO

from launch.config import (
    Config,
    ConfigError,
    ReweightConfig,
    from_dict,
    load_config,
    to_dict,
    validate,
)
from launch.dry_run import count_parameters, dry_run_report
from launch.pretrain import parse_args
from launch.sources import Tokenizer, check_files, padded_vocab_size, train_blend, valid_blend

CONFIGS = sorted((REPO / "configs").glob("**/*.yaml"))


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def demo(*overrides: str) -> Config:
    return load_config(REPO / "configs/demo_cpu.yaml", overrides)


def plausible_world_size(cfg: Config) -> int:
    """Model-parallel size times the largest data-parallel size (of 8, 4, 2, 1) the batch allows."""
    for dp in (8, 4, 2, 1):
        if cfg.train.global_batch_size % (cfg.train.micro_batch_size * dp) == 0:
            return cfg.parallel.model_parallel_size * dp
    raise AssertionError("no data-parallel size divides the global batch")


# --------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads_validates_and_dry_runs(path):
    cfg = load_config(path)
    world_size = plausible_world_size(cfg)
    validate(cfg, world_size)
    report = dry_run_report(cfg, world_size)
    assert f"world size {world_size}" in report
    # The demo configs take the vocabulary from a tokenizer that `make demo` writes: the count
    # and the estimate are there exactly when the vocabulary can be known.
    vocab = cfg.model.vocab_size
    tokenizer = cfg.data.tokenizer_model
    if vocab is None and tokenizer is not None and Path(tokenizer).is_file():
        vocab = Tokenizer.from_model(tokenizer).vocab_size
    if vocab is None:
        assert "\nvocab: unknown, so no parameter count or memory estimate: " in report
        assert "parameters:" not in report and "memory per GPU:" not in report
    else:
        assert f"\nparameters: {count_parameters(cfg, vocab).total:,} = embeddings " in report
        assert "\nmemory per GPU: ~" in report


def test_readme_strategy_table_is_the_registry():
    from megatron_patches.reweighting import STRATEGIES

    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("| `reweight.strategy` | f(x) | effect |") + 2
    rows = lines[start : lines.index("", start)]
    expected = [f"| `{n}` | {s.formula.replace('|', chr(92) + '|')} | {s.effect} |" for n, s in STRATEGIES.items()]
    assert rows == expected


def test_reference_strategy_names_are_aliases():
    assert demo("reweight.strategy=mid").reweight.strategy == "quadratic"
    with pytest.raises(ConfigError, match="did you mean"):
        demo("reweight.strategy=linuper")


def test_strategy_names_are_those_the_reweighting_math_implements():
    from megatron_patches.reweighting import STRATEGIES

    strategy_type = typing.get_type_hints(ReweightConfig)["strategy"]
    assert set(typing.get_args(strategy_type)) == set(STRATEGIES)


def test_paper_configs_have_the_reference_shapes_and_parameter_counts():
    gpt2 = load_config(REPO / "configs/gpt2-124m.yaml")
    # GPT-2 small with 512 learned positions, and Llama-2 7B, to the parameter
    assert count_parameters(gpt2, gpt2.model.vocab_size).total == 124_082_688
    llama = load_config(REPO / "configs/llama-7b.yaml")
    assert count_parameters(llama, llama.model.vocab_size).total == 6_738_415_616
    assert llama.model.ffn_hidden_size == 11008 and llama.parallel.tp == 2
    mid = load_config(REPO / "configs/gpt2-36x768.yaml")  # inherits the rest from gpt2-124m
    assert (mid.model.num_layers, mid.model.num_attention_heads) == (36, 24)
    assert (mid.reweight.strategy, mid.reweight.temperature) == ("linupper", 0.4)
    assert (mid.train.micro_batch_size, mid.optim.lr) == (12, 5e-4)


# --------------------------------------------------------------------------- loading and --set


@pytest.mark.parametrize(
    "override, read",
    [
        ("train.steps=7", lambda c: c.train.steps == 7),
        ("optim.lr=3e-4", lambda c: c.optim.lr == 3e-4),  # YAML reads 3e-4 as a string
        ("optim.lr=1", lambda c: c.optim.lr == 1.0 and isinstance(c.optim.lr, float)),
        ("logging.tensorboard=false", lambda c: c.logging.tensorboard is False),
        ("checkpoint.keep=null", lambda c: c.checkpoint.keep is None),
        ("data.prefixes=[a/x, b/y]", lambda c: c.data.prefixes == ["a/x", "b/y"]),
        ("data.weights={code: 2, prose: 1}", lambda c: c.data.weights == {"code": 2, "prose": 1}),
        ("data.weights.code=3", lambda c: c.data.weights == {"code": 3.0}),
        ("engine=deepspeed", lambda c: c.engine == "deepspeed"),
        ("deepspeed.zero_stage=3", lambda c: c.deepspeed.zero_stage == 3),
    ],
)
def test_set_overrides_parse_values_as_yaml(override, read):
    assert read(demo(override))


def test_later_overrides_win_and_derived_sizes_follow_them():
    cfg = demo("train.steps=5", "train.steps=6", "model.hidden_size=96", "model.activation=swiglu")
    assert cfg.train.steps == 6
    assert cfg.model.ffn_hidden_size == 256  # Llama rule: 8/3 * 96 = 256, rounded up to 256
    assert cfg.model.max_position_embeddings == cfg.model.seq_length
    assert cfg.model.num_query_groups == cfg.model.num_attention_heads


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train.step=3",
            "unknown key 'train.step'; did you mean 'train.steps'? valid keys in train: steps,",
        ),
        ("trian.steps=3", "unknown key 'trian'; did you mean 'train'?"),
        ("train.steps=many", "train.steps: expected int, got 'many' (str)"),
        ("train.steps=2.5", "train.steps: expected int"),
        ("model.untie_embeddings=1", "model.untie_embeddings: expected bool"),
        ("reweight.strategy=linuper", "is not one of 'uniform', 'linupper'"),
        ("reweight.strategy=linuper", "did you mean 'linupper'?"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage: 4 is not one of 0, 1, 2, 3"),
        ("data.prefixes=[a, 3]", "data.prefixes[1]: expected str"),
        ("train.steps.max=3", "train.steps is a value, not a section"),
        ("train.steps", "--set expects KEY=VALUE"),
        ("model=3", "model must be a mapping with keys num_layers, hidden_size"),
    ],
)
def test_unknown_keys_and_wrong_types_are_refused_with_the_alternatives(override, message):
    with pytest.raises(ConfigError) as error:
        demo(override)
    assert message in str(error.value)


def test_unknown_keys_in_yaml_are_refused_too(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", "optim:\n  learning_rate: 0.1\n")
    expected = "unknown key 'optim.learning_rate'.*valid keys in optim: name, lr"
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_base_files_are_merged_under_the_including_file(tmp_path):
    (tmp_path / "sizes").mkdir()
    write_yaml(
        tmp_path / "sizes/base.yaml",
        """
        model:
          num_layers: 2
          hidden_size: 64
        train:
          steps: 9
        """,
    )
    child = write_yaml(tmp_path / "child.yaml", "base: sizes/base.yaml\nmodel:\n  num_layers: 3\n")
    cfg = load_config(child, ["train.seed=5"])
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (3, 64)
    assert (cfg.train.steps, cfg.train.seed) == (9, 5)


def test_a_base_loop_is_refused(tmp_path):
    write_yaml(tmp_path / "a.yaml", "base: b.yaml\n")
    write_yaml(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="include each other in a loop"):
        load_config(tmp_path / "a.yaml")


def test_saved_config_reads_back_identically(tmp_path):
    cfg = load_config(REPO / "configs/llama-7b.yaml", ["data.weights={a: 1.0}"])
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    assert load_config(saved) == cfg == from_dict(to_dict(cfg))


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        demo().train.steps = 3


def test_command_line():
    args = parse_args("--config c.yaml --run-dir r --set a.b=1 c.d=2 --set e=3".split())
    assert (args.config, args.run_dir, args.dry_run) == ("c.yaml", "r", False)
    assert args.overrides == ["a.b=1", "c.d=2", "e=3"]
    assert parse_args(["--config", "c.yaml", "--dry-run", "--world-size", "64"]).world_size == 64
    with pytest.raises(SystemExit):
        parse_args(["--config", "c.yaml"])  # a training run needs --run-dir


def test_help_teaches_with_examples(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert "--set reweight.strategy=linupper" in help_text and "--dry-run" in help_text


# --------------------------------------------------------------------------- validation rules


@pytest.mark.parametrize(
    "overrides, world_size, message",
    [
        ("", 3, "train.global_batch_size=16 is not divisible by micro_batch_size*DP = 4*3 = 12"),
        ("parallel.tp=2 parallel.pp=2", 6, "world size 6 is not divisible by TP*PP*CP = 2*2*1 = 4"),
        (
            "train.global_batch_size=30",
            2,
            "train.global_batch_size=30 is not divisible by micro_batch_size*DP = 4*2 = 8:"
            " set train.global_batch_size to a multiple of 8 (e.g. 32)",
        ),
        (
            "parallel.tp=3",
            3,
            "model.num_attention_heads=4 is not divisible by parallel.tp=3: choose parallel.tp among 1, 2, 4",
        ),
        (
            "model.num_query_groups=3",
            1,
            "model.num_attention_heads=4 is not divisible by model.num_query_groups=3",
        ),
        (
            "model.num_attention_heads=12 model.hidden_size=384 model.num_query_groups=4 parallel.tp=6",
            6,
            "model.num_query_groups=4 and parallel.tp=6 must divide one another",
        ),
        (
            "model.hidden_size=130",
            1,
            "model.hidden_size=130 is not divisible by model.num_attention_heads=4",
        ),
        (
            "parallel.pp=3",
            3,
            "model.num_layers=4 is not divisible by parallel.pp=3: choose parallel.pp among 1, 2, 4",
        ),
        ("parallel.cp=3", 3, "model.seq_length=128 is not divisible by 2*parallel.cp = 6"),
        ("parallel.sequence_parallel=true", 2, "sequence_parallel=true needs parallel.tp > 1"),
        ("engine=deepspeed parallel.pp=2", 2, "engine=deepspeed runs only parallel.pp=1 and"),
        (
            "engine=deepspeed parallel.distributed_optimizer=true",
            2,
            "use deepspeed.zero_stage >= 1",
        ),
        (
            "engine=deepspeed deepspeed.zero_stage=0 model.precision=bf16",
            2,
            "DeepSpeed accumulates gradients in fp32 (as Megatron's engine does) only under ZeRO",
        ),
        ("reweight.temperature=0", 2, "reweight.temperature=0.0 must be > 0"),
        ("reweight.warmup_temperature=-1", 2, "reweight.warmup_temperature=-1.0 must be > 0"),
        ("optim.min_lr=1", 2, "optim.min_lr=1.0 exceeds optim.lr=0.001"),
        ("data.prefixes=[a]", 2, "set exactly one of data.blend"),
        ("data.weights=[1,2]", 2, "data.weights is a list but data.blend is set"),
        (
            "data.blend=null data.prefixes=[a,b] data.weights=[1]",
            2,
            "data.weights has 1 entries for 2 data.prefixes",
        ),
        ("data.split=99/1", 2, "data.split='99/1' must be three shares"),
        (
            "model.max_position_embeddings=64",
            2,
            "model.max_position_embeddings=64 is below model.seq_length=128",
        ),
        ("train.steps=0", 2, "train.steps=0 must be >= 1"),
    ],
)
def test_impossible_configs_are_refused_saying_what_to_change(overrides, world_size, message):
    with pytest.raises(ConfigError) as error:
        validate(demo(*overrides.split()), world_size)
    assert message in str(error.value)


def test_fewer_kv_groups_than_tensor_parallel_ranks_is_allowed():
    # Megatron-Core shares each of the 2 K/V groups between 4 of the 8 TP ranks.
    cfg = demo("model.num_attention_heads=8", "model.num_query_groups=2", "parallel.tp=8")
    validate(cfg, 8)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize(
    "key",
    [
        "reweight.temperature",
        "reweight.warmup_temperature",
        "optim.clip_grad",
        "optim.lr",
        "model.init_method_std",
        "train.exit_duration_minutes",
    ],
)
def test_non_finite_numbers_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"{key}: .* is not a finite number"):
        demo(f"{key}={value}")


def test_a_non_finite_domain_weight_is_refused_naming_the_domain():
    with pytest.raises(ConfigError, match=r"data.weights.code: .* is not a finite number"):
        demo("data.weights={code: .nan, prose: 1.0}")


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.exit_after=-1", "train.exit_after=-1 must be >= 1"),
        ("train.exit_after=0", "train.exit_after=0 must be >= 1"),
        ("train.eval_iters=0", "train.eval_iters=0 must be >= 1"),
        ("train.seed=-1", "train.seed=-1 must be >= 0"),
        ("model.init_method_std=-0.02", "model.init_method_std=-0.02 must be > 0"),
        ("train.exit_duration_minutes=0", "train.exit_duration_minutes=0.0 must be > 0"),
    ],
)
def test_out_of_range_values_are_refused(override, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        validate(demo(override), 2)


@pytest.mark.parametrize(
    "text, named",
    [
        ("optim:\n  lr: 0.1\ntrain:\n  steps: 3\noptim:\n  lr: 0.2\n", "key 'optim' is given twice, on lines 1 and 5"),
        ("optim:\n  lr: 0.1\n  lr: 0.2\n", "key 'lr' is given twice, on lines 2 and 3"),
    ],
)
def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path, text, named):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(named)) as error:
        load_config(path)
    assert str(path) in str(error.value)


def test_experiment_changes_name_what_a_resume_may_not_change():
    from launch.config import experiment_changes

    saved = to_dict(demo())
    assert (
        experiment_changes(saved, demo("parallel.tp=2", "train.log_interval=3", "checkpoint.keep=5"), saved_dp=1, dp=1)
        == []
    )
    changes = experiment_changes(
        saved, demo("reweight.strategy=quadratic", "optim.lr=0.1", "train.seed=7"), saved_dp=1, dp=1
    )
    assert changes == [
        "train.seed: 1234 -> 7",
        "optim.lr: 0.001 -> 0.1",
        "reweight.strategy: 'linupper' -> 'quadratic'",
    ]


def test_a_resume_keeping_the_global_micro_batch_under_another_dp_is_the_same_experiment():
    from launch.config import experiment_changes

    saved = to_dict(demo("train.micro_batch_size=8"))
    assert experiment_changes(saved, demo("train.micro_batch_size=4"), saved_dp=1, dp=2) == []
    assert experiment_changes(saved, demo("train.micro_batch_size=8"), saved_dp=1, dp=2) == [
        "global micro-batch (DP x train.micro_batch_size): 1 x 8 = 8 -> 2 x 8 = 16;"
        " train.micro_batch_size=4 keeps it under DP 2"
    ]
    assert experiment_changes(saved, demo("train.micro_batch_size=4"), saved_dp=1, dp=1) == [
        "global micro-batch (DP x train.micro_batch_size): 1 x 8 = 8 -> 1 x 4 = 4;"
        " train.micro_batch_size=8 keeps it under DP 1"
    ]


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as error:
        validate(demo("parallel.pp=3", "reweight.temperature=0"), 3)
    assert "parallel.pp=3" in str(error.value) and "reweight.temperature" in str(error.value)


def test_missing_data_files_are_named_with_the_fix(tmp_path):
    cfg = demo(f"data.blend={tmp_path}/none.blend.json", f"data.tokenizer_model={tmp_path}/none.model")
    validate(cfg, 2)
    with pytest.raises(ConfigError) as error:
        check_files(cfg)
    assert "none.blend.json not found: run `python -m data_prep tokenize`" in str(error.value)
    assert "none.model not found: train one with `python -m data_prep train" in str(error.value)


# --------------------------------------------------------------------------- blends


def write_dataset(prefix: Path, documents: list[list[int]]) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for document in documents:
        builder.add_document(np.array(document), [len(document)])
    builder.finalize(f"{prefix}.idx")


def write_tokenizer(path_prefix: Path) -> Path:
    import sentencepiece

    lines = [f"sample {i} of a tiny corpus about reweighting and tokens" for i in range(200)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(path_prefix), vocab_size=60, model_type="bpe"
    )
    return Path(f"{path_prefix}.model")


@pytest.fixture
def blend_dir(tmp_path):
    """A data_prep-style blend: prefixes relative to the blend file, natural weights 0.75/0.25."""
    data = tmp_path / "data"
    data.mkdir()
    write_dataset(data / "train_code", [[1, 2, 3]] * 3)
    write_dataset(data / "train_prose", [[4, 5, 6]])
    domains = {
        "code": {"prefix": "train_code", "documents": 3, "tokens": 9, "weight": 0.75},
        "prose": {"prefix": "train_prose", "documents": 1, "tokens": 3, "weight": 0.25},
    }
    tokenizer = write_tokenizer(data / "tokenizer")
    blend = {"tokenizer_model": str(tokenizer), "domains": domains}
    (data / "train.blend.json").write_text(json.dumps(blend))
    return data


def complete(blend_dir, *overrides):
    return demo(
        f"data.blend={blend_dir}/train.blend.json",
        f"data.valid_blend={blend_dir}/train.blend.json",
        f"data.tokenizer_model={blend_dir}/tokenizer.model",
        *overrides,
    )


def test_a_truncated_or_empty_dataset_is_refused_at_start_up_naming_the_file(blend_dir):
    check_files(complete(blend_dir))
    bin_file = blend_dir / "train_code.bin"
    bin_file.write_bytes(bin_file.read_bytes()[:-2])  # one uint16 token short
    with pytest.raises(ConfigError, match="train_code.bin"):
        check_files(complete(blend_dir))
    write_dataset(blend_dir / "train_code", [])
    with pytest.raises(ConfigError, match="train_code"):
        check_files(complete(blend_dir))


def test_a_blend_from_another_tokenizer_is_refused(blend_dir):
    blend = json.loads((blend_dir / "train.blend.json").read_text())
    blend["tokenizer_sha256"] = "0" * 64  # the tokens came from a tokenizer with other content
    (blend_dir / "train.blend.json").write_text(json.dumps(blend))
    with pytest.raises(ConfigError, match="was tokenized with .* whose content differs"):
        check_files(complete(blend_dir))


def test_a_fixed_vocabulary_far_above_the_tokenizer_is_noted(blend_dir):
    report = dry_run_report(complete(blend_dir, "model.vocab_size=50257"), 2)
    assert "the tokenizer has 60 tokens, so 50197 rows are never used" in report
    assert "never used" not in dry_run_report(complete(blend_dir), 2)


def test_a_data_weights_typo_is_a_dry_run_problem(blend_dir):
    report = dry_run_report(complete(blend_dir, "data.weights={cod: 1, prose: 3}"), 2)
    assert "unknown ['cod']" in report and "problems: 1" in report


def test_blend_prefixes_resolve_relative_to_the_blend_file(blend_dir):
    cfg = demo(f"data.blend={blend_dir}/train.blend.json", "data.valid_blend=null")
    blend = train_blend(cfg)
    assert blend.domains == ["code", "prose"]
    assert blend.prefixes == [str(blend_dir / "train_code"), str(blend_dir / "train_prose")]
    assert blend.weights == [0.75, 0.25]
    assert valid_blend(cfg) is None


def test_domain_weights_override_the_blend_and_zero_drops_a_domain(blend_dir):
    base = [f"data.blend={blend_dir}/train.blend.json"]
    assert train_blend(demo(*base, "data.weights={code: 1, prose: 3}")).weights == [0.25, 0.75]
    assert train_blend(demo(*base, "data.weights={code: 0, prose: 3}")).domains == ["prose"]
    with pytest.raises(ConfigError, match=r"unknown \['cod'\], missing \['code'\]"):
        train_blend(demo(*base, "data.weights={cod: 1, prose: 3}"))


def test_plain_prefixes_are_weighted_by_tokens_unless_given(blend_dir):
    prefixes = f"data.prefixes=[{blend_dir}/train_code, {blend_dir}/train_prose]"
    blend = train_blend(demo("data.blend=null", prefixes))
    assert (blend.domains, blend.weights) == (["train_code", "train_prose"], [0.75, 0.25])
    given = train_blend(demo("data.blend=null", prefixes, "data.weights=[1, 1]"))
    assert given.weights == [0.5, 0.5]


def test_a_complete_config_is_ready_to_run(blend_dir):
    cfg = demo(
        f"data.blend={blend_dir}/train.blend.json",
        f"data.valid_blend={blend_dir}/train.blend.json",
        f"data.tokenizer_model={blend_dir}/tokenizer.model",
    )
    validate(cfg, 2)
    check_files(cfg)
    report = dry_run_report(cfg, 2)
    assert "vocab: 60 (from" in report and "padded to 128" in report
    assert "data train:" in report and "code 0.750, prose 0.250" in report
    assert report.endswith("problems: none, ready to run")
    with pytest.raises(ConfigError, match="model.vocab_size=50 is smaller than the tokenizer's 60"):
        check_files(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=50)))


# --------------------------------------------------------------------------- dry run


def test_dry_run_report_shows_layout_batch_parameters_and_memory():
    cfg = load_config(REPO / "configs/gpt2-124m.yaml", ["parallel.tp=2"])
    report = dry_run_report(cfg, 16)
    assert "world size 16 = TP 2 x PP 1 x CP 1 x DP 8" in report
    assert "global 384 = micro 8 x DP 8 x 6 micro-batches per step" in report
    assert "196,608 tokens per step" in report
    assert "padded to 50432" in report  # a multiple of 128 * TP
    assert "memory per GPU: ~" in report and "assumptions: bf16" in report
    assert "uniform weights for the first 1000 steps" in report
    assert "problems: 3" in report and "train.blend.json not found" in report


def test_sharding_the_optimizer_shrinks_the_memory_estimate():
    from launch.dry_run import estimate_memory

    def memory(*overrides):
        cfg = load_config(REPO / "configs/gpt2-124m.yaml", overrides)
        return estimate_memory(cfg, count_parameters(cfg, cfg.model.vocab_size), 8)

    plain, sharded = memory(), memory("parallel.distributed_optimizer=true")
    assert sharded.optimizer == pytest.approx(plain.optimizer / 8)
    assert sharded.weights == plain.weights
    zero0, zero3 = (
        memory("engine=deepspeed", "deepspeed.zero_stage=0"),
        memory("engine=deepspeed", "deepspeed.zero_stage=3"),
    )
    assert zero3.weights == pytest.approx(zero0.weights / 8) == pytest.approx(plain.weights / 8)
    assert zero3.grads == pytest.approx(zero0.grads / 8)
    # Megatron reduces gradients in fp32 buffers (grad_reduce_in_fp32): twice bf16 weights' bytes
    assert plain.grads == pytest.approx(2 * plain.weights)


MEGATRON_PARAMETER_COUNT = """
import json, sys
from datetime import timedelta
import torch, torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

store = torch.distributed.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(minutes=5))
torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
parallel_state.initialize_model_parallel()
counts = []
for m in json.loads(sys.argv[1]):
    config = TransformerConfig(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"],
        num_attention_heads=m["num_attention_heads"], num_query_groups=m["num_query_groups"],
        ffn_hidden_size=m["ffn_hidden_size"], normalization=m["normalization"],
        gated_linear_unit=m["activation"] == "swiglu",
        activation_func=F.silu if m["activation"] == "swiglu" else F.gelu,
        add_bias_linear=m["add_bias_linear"], use_cpu_initialization=True,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization=m["normalization"]),
        vocab_size=m["padded_vocab_size"], max_sequence_length=m["max_position_embeddings"],
        position_embedding_type=m["position_embedding"],
        share_embeddings_and_output_weights=not m["untie_embeddings"],
    )
    counts.append(sum(p.numel() for p in model.parameters()))
print(json.dumps(counts))
"""


def test_parameter_count_matches_a_real_megatron_gpt_model():
    gpt2_like = demo("model.vocab_size=1000")
    llama_like = demo(
        "model.vocab_size=1000",
        "model.position_embedding=rope",
        "model.normalization=RMSNorm",
        "model.activation=swiglu",
        "model.num_query_groups=2",
        "model.add_bias_linear=false",
        "model.untie_embeddings=true",
    )
    configs = [gpt2_like, llama_like]
    models = [dict(to_dict(c)["model"], padded_vocab_size=padded_vocab_size(c, 1000)) for c in configs]
    result = subprocess.run(
        [sys.executable, "-c", MEGATRON_PARAMETER_COUNT, json.dumps(models)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    real = json.loads(result.stdout.strip().splitlines()[-1])
    assert [count_parameters(c, 1000).total for c in configs] == real


# --------------------------------------------------------------------------- launch scripts


@pytest.mark.parametrize("script", ["launch/run.sh", "launch/slurm/pretrain.sbatch"])
def test_launch_scripts_parse(script):
    subprocess.run(["bash", "-n", str(REPO / script)], check=True)


def fake_command(folder: Path, name: str, body: str = "printf '<%s>' \"$@\"") -> None:
    """An executable that prints its arguments, each in <>, so quoting is visible."""
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"#!/bin/sh\n{body}\n")
    (folder / name).chmod(0o755)


def run_script(script: str, args: list[str], env: dict) -> str:
    env = {"PATH": os.environ["PATH"], **env}
    done = subprocess.run(["bash", str(REPO / script), *args], env=env, capture_output=True, text=True, check=True)
    return done.stdout


def test_run_sh_starts_torchrun_or_a_dry_run(tmp_path):
    fake_command(tmp_path, "python")
    env = {"PYTHON": str(tmp_path / "python"), "NGPU": "4", "CONFIG": "configs/gpt2-124m.yaml"}
    train = run_script("launch/run.sh", ["--set", "a=b c"], env)
    assert train == (
        "<-m><launch.torchrun><--standalone><--nproc-per-node><4><-m><launch.pretrain>"
        "<--config><configs/gpt2-124m.yaml><--run-dir><runs/gpt2-124m><--set><a=b c>"
    )
    dry = run_script("launch/run.sh", [], {**env, "DRY_RUN": "1"})
    assert dry == ("<-m><launch.pretrain><--config><configs/gpt2-124m.yaml><--dry-run><--world-size><4>")


def test_slurm_script_starts_one_torchrun_per_node_with_c10d_rendezvous(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "scontrol", "printf 'node-a\\nnode-b\\n'")
    fake_command(bin_dir, "srun")
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "42",
        "SLURM_SUBMIT_DIR": str(REPO),  # sbatch runs a copy of the script: the repository is where it was submitted
        "GPUS_PER_NODE": "4",
        "IMAGE": "pretrain.sqsh",
    }
    out = run_script("launch/slurm/pretrain.sbatch", ["--config", "c.yaml", "--set", "a=b c"], env)
    assert "<--ntasks-per-node=1><--kill-on-bad-exit=1><--container-image><pretrain.sqsh>" in out
    assert f"<--container-mounts><{REPO}:{REPO}>" in out
    assert out.endswith(
        "<python><-m><launch.torchrun><--nnodes><2><--nproc-per-node><4>"
        "<--rdzv-backend><c10d><--rdzv-endpoint><node-a:29500><--rdzv-id><42><--max-restarts><3>"
        "<-m><launch.pretrain><--config><c.yaml><--set><a=b c>"
    )


@pytest.mark.parametrize("number, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_slurm_script_passes_the_stop_signal_to_the_step_and_requeues_only_before_the_time_limit(
    tmp_path, number, requeued
):
    """USR1 (the time-limit warning) and TERM (scancel, preemption) reach the ranks through
    `scancel --signal`, not through srun; only USR1 requeues. tests/e2e/test_slurm.py runs the real thing."""
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "scontrol", 'if [ "$1" = requeue ]; then echo "requeue $2"; else printf "node-a\\n"; fi')
    # srun stands for the job step: its ranks save and exit 75 on USR1 or TERM; srun itself
    # must never be signalled (the real one turns TERM into SIGKILL of the step).
    fake_command(
        bin_dir,
        "srun",
        f'echo $$ > {tmp_path}/step.pid; trap "exit 75" USR1 TERM; echo started; while :; do sleep 0.1; done',
    )
    fake_command(bin_dir, "scancel", f'echo "scancel $*"; kill -s "${{1#--signal=}}" "$(cat {tmp_path}/step.pid)"')
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node-a",
        "SLURM_NNODES": "1",
        "SLURM_JOB_ID": "42",
        "SLURM_SUBMIT_DIR": str(REPO),
        "GPUS_PER_NODE": "1",
    }
    # Its own session, so that whatever the script leaves running can be ended with it.
    job = subprocess.Popen(
        ["bash", str(REPO / "launch/slurm/pretrain.sbatch"), "--config", "c.yaml"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for_line(job, "started", seconds=60)
        job.send_signal(number)
        out, _ = job.communicate(timeout=60)
    finally:
        end_session(job)
    assert f"scancel --signal={number.name[3:]} 42" in out
    assert ("requeue 42" in out) == requeued
    assert job.returncode == 75


def wait_for_line(process: subprocess.Popen, text: str, seconds: float) -> None:
    """Read `process`'s output up to a line holding `text`; fail if it ends first or takes longer."""
    found = threading.Event()

    def read() -> None:
        for line in process.stdout:
            if text in line:
                found.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(seconds)
    if found.is_set():
        return
    if reader.is_alive():
        end_session(process)
        raise AssertionError(f"no {text!r} line from the script within {seconds} s")
    raise AssertionError(f"the script ended (exit {process.wait()}) before printing {text!r}")


def end_session(process: subprocess.Popen) -> None:
    """Kill what is left of a process started with start_new_session (a pass leaves nothing)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
