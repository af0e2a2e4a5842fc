"""One typed configuration for a pretraining run.

A run is one YAML file whose sections mirror the dataclasses below. A file may name a
``base:`` file (relative to itself) whose values it overrides, and any field can be set
from the command line with ``--set section.key=value``. Loading refuses unknown keys and
wrongly typed values and names what would have been valid, so a typo never falls back to
a default silently. ``validate`` then checks what depends on the world size and the engine;
`launch.sources` checks the data files.

Relative paths in a config (data files, tokenizer, checkpoints) are relative to the
working directory the run is started from (the repository root); prefixes inside a blend
file are relative to the blend file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from launch.engines import engine_class
from launch.models import FAMILIES, family_problems
from megatron_patches.reweighting import ReweightSettings


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the GPT/Llama model; null fields are filled in from the others on load."""

    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    num_query_groups: int | None = None  # null = one K/V group per head (multi-head attention)
    ffn_hidden_size: int | None = None  # null = 4*hidden (gelu) or the Llama rule (swiglu)
    seq_length: int = 512
    max_position_embeddings: int | None = None  # null = seq_length
    position_embedding: Literal["learned_absolute", "rope"] = "learned_absolute"
    rotary_base: int = 10000
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    activation: Literal["gelu", "swiglu"] = "gelu"
    # A module of launch/models/; auto = the family whose signature (the three fields above) they match.
    family: Literal[("auto", *FAMILIES)] = "auto"
    add_bias_linear: bool = True
    untie_embeddings: bool = False
    init_method_std: float = 0.02
    vocab_size: int | None = None  # null = the tokenizer's vocabulary size
    make_vocab_size_divisible_by: int = 128
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 on GPU, fp32 on CPU
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    # Megatron-LM's activation recomputation: selective = the attention core; full = whole layers (method, num_layers)
    recompute_granularity: Literal["selective", "full"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None

    def __post_init__(self):
        # Resolved here so every consumer sees concrete sizes and the saved config is explicit.
        if self.num_query_groups is None:
            object.__setattr__(self, "num_query_groups", self.num_attention_heads)
        if self.max_position_embeddings is None:
            object.__setattr__(self, "max_position_embeddings", self.seq_length)
        if self.ffn_hidden_size is None:
            object.__setattr__(self, "ffn_hidden_size", default_ffn_hidden_size(self))


def default_ffn_hidden_size(model: ModelConfig) -> int:
    """4*hidden for GELU; for SwiGLU the Llama rule (2/3 of that, rounded up to 256),
    which keeps the three SwiGLU matrices at the parameter count of two GELU ones."""
    if model.activation == "gelu":
        return 4 * model.hidden_size
    return 256 * math.ceil(8 * model.hidden_size / 3 / 256)


@dataclass(frozen=True)
class ParallelConfig:
    """Model parallelism; data parallelism is what is left: DP = world / (tp*pp*cp)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    global_batch_size: int = 32
    micro_batch_size: int = 4
    log_interval: int = 10
    seed: int = 1234
    eval_interval: int = 100
    eval_iters: int = 10
    # Stop after this many steps of one invocation, with a checkpoint, e.g. to fit a
    # cluster time limit; the next invocation with the same run dir goes on. null = run to the end.
    exit_after: int | None = None
    # Stop with a checkpoint once this much wall-clock time has passed since the start (like
    # Megatron-LM's --exit-duration-in-mins); null = no limit.
    exit_duration_minutes: float | None = None

    def micro_batches_per_step(self, data_parallel_size: int) -> int:
        """Micro-batches each data-parallel rank runs per optimizer step (gradient accumulation).
        At least 1 even for a config `validate` refuses, so that checks needing it still run."""
        return max(1, self.global_batch_size // max(1, self.micro_batch_size * data_parallel_size))


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "adam"] = "adamw"
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # 0 = no clipping


@dataclass(frozen=True)
class DataConfig:
    """Training data: either a data_prep blend file or a list of dataset prefixes."""

    blend: str | None = None  # a data_prep `P.blend.json`
    prefixes: list[str] | None = None
    # Overrides the natural weights (e.g. DoReMi/DoGE domain weights): a dict domain -> weight
    # with `blend`, a list with `prefixes`. null = the blend's weights / token shares.
    weights: dict[str, float] | list[float] | None = None
    valid_blend: str | None = None  # held-out blend for per-domain validation
    tokenizer_model: str | None = None  # SentencePiece model
    # train,valid,test shares of every training dataset's documents, used only when valid_blend
    # is null. Megatron normalises all three, so the test share holds documents back from both
    # training and validation; no test set is built from them.
    split: str = "99,1,0"
    cache_dir: str | None = None  # null = <run_dir>/data_cache
    # Documents kept apart inside a sample (Megatron's flags of the same names; a document ends
    # with the tokenizer's EOS): positions restart at 0 after each end-of-document token; a
    # position attends to its own document only (the SDPA attention of model.transformer_impl=local);
    # no loss on predicting the token after an end-of-document token.
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = 1000  # save every `interval` steps
    keep: int | None = None  # null = keep all; else the last `keep`
    # A checkpoint directory to resume from when the run directory has none of its own: the
    # model, optimizer, RNG, schedules and step all continue from it (and the experiment must
    # match it, as on any resume).
    load: str | None = None
    # Write shards from a background process while training goes on (Megatron-LM's --async-save);
    # a checkpoint counts only once every rank's write has finished.
    async_save: bool = False
    # Resuming with another experiment (model, data, strategy, seed, batch, optimizer, schedule)
    # is refused unless this is true; layouts, logging and intervals may always change.
    allow_config_change: bool = False


# Loss-based sample reweighting (Sow et al., ICLR 2025): one definition with the
# `--reweight-*` flags of megatron_patches.megatron_lm; the math is in megatron_patches/reweighting.py.
ReweightConfig = ReweightSettings


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    # Weights & Biases beside TensorBoard (rank 0; needs `pip install wandb`). "offline" writes
    # RUN/wandb/ for a later `wandb sync` (compute nodes often have no internet); "online" uploads.
    wandb: bool = False
    wandb_project: str = "loss-reweighting"
    wandb_mode: Literal["offline", "online"] = "offline"
    # The device's dense bf16 peak in TFLOP/s for MFU; null = from launch/throughput.py's table
    # on a GPU it knows, and no MFU on a CPU.
    peak_tflops: float | None = None
    # Every N steps, the domain, documents, loss and weight of each sample of the step's first
    # global micro-batch (at most DP x micro_batch_size lines) to RUN/weights/step_XXXXXXXX.jsonl,
    # for `python -m launch.tools.report --weights RUN`; null = no log. One weight per sequence,
    # so not with reweight.unit=document.
    weights_every: int | None = None


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 1
    config: str | None = None  # a DeepSpeed JSON merged over the generated one


@dataclass(frozen=True)
class FaultsConfig:
    """When a job that cannot go on ends, so that torchrun's restart or the job's requeue takes
    over from the last checkpoint (launch/watchdog.py)."""

    # A step is hung once it has run hang_multiple x the median of the last 20 steps, but
    # never before hang_min_seconds; the first step, evaluation and saves get hang_max_minutes.
    hang_multiple: float = 10.0
    hang_min_seconds: float = 120.0
    hang_max_minutes: float = 20.0
    # A collective that waits this long for a lost rank fails (gloo and NCCL process groups).
    collective_timeout_minutes: float = 10.0


@dataclass(frozen=True)
class Config:
    engine: Literal["megatron", "deepspeed"] = "megatron"  # a module of launch/engines/
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read `path` (and its `base:` chain), apply `--set` style overrides, type-check."""
    raw = _read_yaml_with_base(Path(path), seen=())
    for override in overrides:
        _apply_override(raw, override)
    return from_dict(raw)


def from_dict(raw: dict) -> Config:
    """Build a Config from plain data (a loaded YAML file, a saved checkpoint's config)."""
    return _build(Config, raw, prefix="")


def to_dict(cfg: Config) -> dict:
    """Plain data for saving run_dir/config.yaml and checkpoints; `from_dict` reads it back."""
    return dataclasses.asdict(cfg)


# Fields a resumed run may change freely: how it runs and reports, not what it trains.
RESUMABLE_CHANGES = (
    "parallel.",
    "logging.",
    "checkpoint.",
    "faults.",
    "deepspeed.config",
    "data.cache_dir",
    "train.log_interval",
    "train.eval_interval",
    "train.eval_iters",
    "train.exit_after",
    "train.exit_duration_minutes",
    "model.transformer_impl",
)


def experiment_changes(saved: dict, current: Config, *, saved_dp: int, dp: int) -> list[str]:
    """`key: old -> new` for every field that changes the experiment between a checkpoint's
    config (saved under data-parallel size `saved_dp`) and this run's (under `dp`), those of
    RESUMABLE_CHANGES excepted.

    Weights are normalised over each global micro-batch, DP × micro_batch_size samples, so
    that product is compared rather than micro_batch_size alone: DP 1 → 2 with micro-batch
    8 → 4 normalises the same samples together and is the same experiment."""
    old, new = flatten(to_dict(from_dict(saved))), flatten(to_dict(current))
    changes = []
    for key in new:
        if key == "train.micro_batch_size":
            before, after = saved_dp * old[key], dp * new[key]
            if before != after:
                hint = f"; train.micro_batch_size={before // dp} keeps it under DP {dp}" if before % dp == 0 else ""
                changes.append(
                    f"global micro-batch (DP x train.micro_batch_size): {saved_dp} x {old[key]} = {before}"
                    f" -> {dp} x {new[key]} = {after}{hint}"
                )
        elif old[key] != new[key] and not key.startswith(RESUMABLE_CHANGES):
            changes.append(f"{key}: {old[key]!r} -> {new[key]!r}")
    return changes


def flatten(settings: dict) -> dict[str, Any]:
    """`section.key` -> value, from plain config data (`to_dict`'s or a saved config.yaml's);
    a field whose value is a mapping (data.weights) stays one value."""
    flat = {}
    for section, values in settings.items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    return flat


def _read_yaml_with_base(path: Path, seen: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config files include each other in a loop: {chain}")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}; {_shipped_configs()}") from None
    except IsADirectoryError:
        raise ConfigError(
            f"{path} is a directory, not a YAML config file: give a file, e.g. configs/demo_cpu.yaml"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"{path} is not a YAML file (not UTF-8 text): give a YAML config file, e.g. configs/demo_cpu.yaml"
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be one file name, got {base!r}")
    return deep_merge(_read_yaml_with_base(path.parent / base, (*seen, path)), raw)


def _shipped_configs() -> str:
    """The configs that come with the project, for a --config that names none."""
    folder = Path(__file__).resolve().parent.parent / "configs"
    names = ", ".join(f"configs/{path.name}" for path in sorted(folder.glob("*.yaml")))
    presets = len(list(folder.glob("paper/*.yaml")))
    return f"the configs here: {names}, and {presets} reference presets in configs/paper/"


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`, except that a key given twice in one mapping is an error: YAML would
    silently keep the second, e.g. of two `optim:` sections."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice, on lines {seen[key] + 1} and {key_node.start_mark.line + 1}:"
                    " keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def deep_merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict, override: str) -> None:
    """`section.key=value`, the value parsed as YAML (numbers, true/false, null, [lists])."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, e.g. --set train.steps=100; got {override!r}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {override}: the value is not valid YAML: {error}") from None
    *sections, leaf = key.split(".")
    node = raw
    for depth, name in enumerate(sections):
        if node.get(name) is None:
            node[name] = {}
        node = node[name]
        if not isinstance(node, dict):
            where = ".".join(sections[: depth + 1])
            raise ConfigError(f"--set {override}: {where} is a value, not a section")
    node[leaf] = value


def _build(cls: type, raw: Any, prefix: str):
    section = prefix.rstrip(".") or "the config"
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(raw, dict):
        raise ConfigError(f"{section} must be a mapping with keys {', '.join(names)}; got {raw!r}")
    for key in raw:
        if key not in names:
            raise _unknown_key(str(key), names, prefix)
    hints = typing.get_type_hints(cls)
    values = {}
    aliases = {f.name: f.metadata.get("aliases", {}) for f in dataclasses.fields(cls)}
    for name in names:
        if name not in raw:
            continue
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], raw[name], f"{prefix}{name}.")
        else:
            value = raw[name]
            if isinstance(value, str):
                value = aliases[name].get(value, value)
            values[name] = _coerce(value, hints[name], f"{prefix}{name}")
    return cls(**values)


def _unknown_key(key: str, valid: list[str], prefix: str) -> ConfigError:
    where = f"in {prefix.rstrip('.')}" if prefix else "at the top level"
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(f"unknown key '{prefix}{key}'{hint} valid keys {where}: {', '.join(valid)}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field type; the only conversions are int -> float,
    number-like strings -> float (YAML reads `1e-3` without a dot as a string) and whole
    numbers such as `1e9` or `2.0` -> int."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        errors = []
        for arm in args:
            try:
                return _coerce(value, arm, key)
            except ConfigError as error:
                errors.append((arm, error))
        for arm, error in errors:  # a list or mapping with one bad item, a non-finite number: say so
            if typing.get_origin(arm) in (list, dict) and isinstance(value, typing.get_origin(arm)):
                raise error
            if arm is float and _is_number(value):
                raise error
    elif origin is Literal:
        for choice in args:
            if type(value) is type(choice) and value == choice:
                return value
        close = difflib.get_close_matches(str(value), [str(c) for c in args], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        choices = ", ".join(repr(c) for c in args)
        raise ConfigError(f"{key}: {value!r} is not one of {choices}{hint}")
    elif origin is list and isinstance(value, list):
        return [_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    elif origin is dict and isinstance(value, dict):
        return {_coerce(k, args[0], f"{key} key"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    elif annotation is type(None) and value is None:
        return None
    elif annotation is float and _is_number(value):
        if not math.isfinite(float(value)):
            raise ConfigError(f"{key}: {value!r} is not a finite number; give a real value")
        return float(value)
    elif annotation in (int, str, bool) and type(value) is annotation:
        return value
    elif annotation is int and _is_number(value) and float(value).is_integer():
        return int(float(value))
    raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {value!r} ({type(value).__name__})")


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        return isinstance(value, str) and math.isfinite(float(value))
    except ValueError:
        return False


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arm) for arm in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is dict:
        return f"a mapping {_type_name(args[0])} -> {_type_name(args[1])}"
    if annotation is type(None):
        return "null"
    return annotation.__name__


# --------------------------------------------------------------------------- validation


def validate(cfg: Config, world_size: int) -> None:
    """Refuse configs that cannot run at `world_size`, listing every problem at once.
    Data files are checked by `launch.sources`; the checkpoint to start from and the data
    cache to write are checked here."""
    problems = _layout_problems(cfg, world_size)
    problems += engine_class(cfg.engine).config_problems(cfg, world_size)
    problems += family_problems(cfg.model)
    problems += _value_problems(cfg)
    problems += _fault_problems(cfg.faults)
    problems += _data_problems(cfg.data)
    problems += _document_problems(cfg)
    problems += _path_problems(cfg)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _next_multiple(value: int, of: int) -> int:
    return of * max(1, math.ceil(value / of))


def _layout_problems(cfg: Config, world_size: int) -> list[str]:
    model, par, train = cfg.model, cfg.parallel, cfg.train
    problems = []
    if min(par.tp, par.pp, par.cp) < 1:
        return [f"parallel.tp/pp/cp must be >= 1, got tp={par.tp} pp={par.pp} cp={par.cp}"]
    mp = par.model_parallel_size
    if world_size < 1 or world_size % mp:
        problems.append(
            f"world size {world_size} is not divisible by TP*PP*CP = {par.tp}*{par.pp}*{par.cp}"
            f" = {mp}: launch a multiple of {mp} processes or change parallel.tp/pp/cp"
        )
    if model.num_attention_heads < 1 or model.hidden_size % model.num_attention_heads:
        problems.append(
            f"model.hidden_size={model.hidden_size} is not divisible by"
            f" model.num_attention_heads={model.num_attention_heads}: choose a head count"
            f" among {_divisors(model.hidden_size)}"
        )
    elif model.num_attention_heads % par.tp:
        problems.append(
            f"model.num_attention_heads={model.num_attention_heads} is not divisible by"
            f" parallel.tp={par.tp}: choose parallel.tp among"
            f" {_divisors(model.num_attention_heads)}"
        )
    groups = model.num_query_groups
    if groups < 1 or model.num_attention_heads % groups:
        problems.append(
            f"model.num_attention_heads={model.num_attention_heads} is not divisible by"
            f" model.num_query_groups={groups}: choose num_query_groups among"
            f" {_divisors(model.num_attention_heads)}"
        )
    elif groups != model.num_attention_heads and groups % par.tp and par.tp % groups:
        problems.append(
            f"model.num_query_groups={groups} and parallel.tp={par.tp} must divide one another"
            f" (each TP rank holds whole K/V groups, or a whole group is shared by TP ranks):"
            f" change parallel.tp or model.num_query_groups"
        )
    if model.num_layers >= 1 and model.num_layers % par.pp:  # below 1: refused by _value_problems
        problems.append(
            f"model.num_layers={model.num_layers} is not divisible by parallel.pp={par.pp}:"
            f" choose parallel.pp among {_divisors(model.num_layers)}"
        )
    if par.cp > 1 and model.seq_length % (2 * par.cp):
        step = 2 * par.cp
        problems.append(
            f"model.seq_length={model.seq_length} is not divisible by 2*parallel.cp = {step}"
            f" (context parallelism splits each sequence into 2*CP load-balanced chunks):"
            f" set model.seq_length to a multiple of {step}"
            f" (e.g. {_next_multiple(model.seq_length, step)})"
        )
    if par.sequence_parallel and par.tp == 1:
        problems.append(
            "parallel.sequence_parallel=true needs parallel.tp > 1 (it shards activations"
            " over the tensor-parallel group): set parallel.tp >= 2 or"
            " parallel.sequence_parallel=false"
        )
    if train.micro_batch_size < 1 or train.global_batch_size < 1:
        problems.append("train.micro_batch_size and train.global_batch_size must be >= 1")
    elif world_size >= 1 and world_size % mp == 0:
        dp = par.data_parallel_size(world_size)
        step = train.micro_batch_size * dp
        if train.global_batch_size % step:
            problems.append(
                f"train.global_batch_size={train.global_batch_size} is not divisible by"
                f" micro_batch_size*DP = {train.micro_batch_size}*{dp} = {step}: set"
                f" train.global_batch_size to a multiple of {step}"
                f" (e.g. {_next_multiple(train.global_batch_size, step)})"
            )
    return problems


def _fault_problems(faults: FaultsConfig) -> list[str]:
    problems = [
        f"faults.{key}={value} must be > 0" for key, value in dataclasses.asdict(faults).items() if not value > 0
    ]
    if not faults.hang_multiple > 1:
        problems.append(f"faults.hang_multiple={faults.hang_multiple} must be > 1 (a multiple of the median step time)")
    if faults.hang_max_minutes * 60 < faults.hang_min_seconds:
        problems.append(
            f"faults.hang_max_minutes={faults.hang_max_minutes} is below faults.hang_min_seconds="
            f"{faults.hang_min_seconds}: raise hang_max_minutes"
        )
    return problems


def _value_problems(cfg: Config) -> list[str]:
    model, train, optim, rw = cfg.model, cfg.train, cfg.optim, cfg.reweight
    at_least_one = {
        "model.num_layers": model.num_layers,
        "model.hidden_size": model.hidden_size,
        "model.seq_length": model.seq_length,
        "model.ffn_hidden_size": model.ffn_hidden_size,
        "model.make_vocab_size_divisible_by": model.make_vocab_size_divisible_by,
        "train.steps": train.steps,
        "train.log_interval": train.log_interval,
        "train.eval_interval": train.eval_interval,
        "checkpoint.interval": cfg.checkpoint.interval,
    }
    if model.vocab_size is not None:
        at_least_one["model.vocab_size"] = model.vocab_size
    if cfg.checkpoint.keep is not None:
        at_least_one["checkpoint.keep"] = cfg.checkpoint.keep
    if train.exit_after is not None:
        at_least_one["train.exit_after"] = train.exit_after
    if cfg.logging.weights_every is not None:
        at_least_one["logging.weights_every"] = cfg.logging.weights_every
    at_least_one["train.eval_iters"] = train.eval_iters  # evaluation runs every eval_interval steps
    problems = [f"{key}={value} must be >= 1" for key, value in at_least_one.items() if value < 1]
    non_negative = {
        "train.seed": train.seed,
        "optim.warmup_steps": optim.warmup_steps,
        "optim.min_lr": optim.min_lr,
        "optim.weight_decay": optim.weight_decay,
        "optim.clip_grad": optim.clip_grad,
    }
    problems += [f"{key}={value} must be >= 0" for key, value in non_negative.items() if value < 0]
    if cfg.logging.peak_tflops is not None and not cfg.logging.peak_tflops > 0:
        problems.append(f"logging.peak_tflops={cfg.logging.peak_tflops} must be > 0 (TFLOP/s), or null")
    if train.exit_duration_minutes is not None and not train.exit_duration_minutes > 0:
        problems.append(f"train.exit_duration_minutes={train.exit_duration_minutes} must be > 0 (minutes), or null")
    if train.seed > 2**32 - 1:
        problems.append(
            f"train.seed={train.seed} is above 2**32-1, numpy's largest seed (Megatron's data"
            " shuffling uses it): choose a seed in [0, 4294967295]"
        )
    samples = train.steps * train.global_batch_size
    index_gib = samples * SAMPLE_INDEX_BYTES / 2**30
    if index_gib > MAX_SAMPLE_INDEX_GIB:
        problems.append(
            f"train.steps={train.steps} needs a sample index of {index_gib:,.0f} GiB"
            f" ({samples:,} samples = train.steps x train.global_batch_size, ~{SAMPLE_INDEX_BYTES}"
            f" bytes each; at most {MAX_SAMPLE_INDEX_GIB} GiB): lower train.steps"
        )
    if optim.warmup_steps >= train.steps:
        problems.append(
            f"optim.warmup_steps={optim.warmup_steps} must be below train.steps={train.steps}:"
            f" lower the LR warm-up (e.g. --set optim.warmup_steps={train.steps // 10})"
        )
    for key, value in {
        "model.hidden_dropout": model.hidden_dropout,
        "model.attention_dropout": model.attention_dropout,
        "optim.beta1": optim.beta1,
        "optim.beta2": optim.beta2,
    }.items():
        if not 0 <= value < 1:
            problems.append(f"{key}={value} must be in [0, 1)")
    if model.position_embedding == "learned_absolute" and (model.max_position_embeddings < model.seq_length):
        problems.append(
            f"model.max_position_embeddings={model.max_position_embeddings} is below"
            f" model.seq_length={model.seq_length}: raise it or set it to null"
        )
    if not model.init_method_std > 0:
        problems.append(f"model.init_method_std={model.init_method_std} must be > 0 (0.02 is GPT-2's)")
    if optim.lr <= 0 or optim.eps <= 0:
        problems.append(f"optim.lr={optim.lr} and optim.eps={optim.eps} must be > 0")
    elif optim.lr > 1:  # Adam moves every weight by ~lr per step: above 1 the loss diverges to NaN
        problems.append(f"optim.lr={optim.lr} must be in (0, 1]: lower it (GPT-2 small trains at 5e-4)")
    elif optim.min_lr > optim.lr:
        problems.append(f"optim.min_lr={optim.min_lr} exceeds optim.lr={optim.lr}: lower optim.min_lr")
    if model.position_embedding == "rope" and model.rotary_base <= 0:
        problems.append(
            f"model.rotary_base={model.rotary_base} must be > 0 with model.position_embedding=rope"
            " (10000 is the usual base)"
        )
    problems += rw.problems(train.steps, name=lambda key: f"reweight.{key}", train_steps_name="train.steps")
    return problems


# Megatron's GPTDataset and BlendedDataset index every sample of the run in numpy (built on
# one rank, then memory-mapped by every rank): at worst 34 bytes each, a sample index of
# 2 x int64, a shuffle index of int64 and the blend's int16 dataset id and int64 sample id.
# The bound is fixed, not a share of this machine's memory, so that a --dry-run on a login node
# judges as the job would: 16 GiB is ~500M samples, 20x the largest shipped config's (25.6M),
# so more is a typo rather than a run.
SAMPLE_INDEX_BYTES = 34
MAX_SAMPLE_INDEX_GIB = 16


def _data_problems(data: DataConfig) -> list[str]:
    if (data.blend is None) == (data.prefixes is None):
        return ["set exactly one of data.blend (a data_prep blend.json) and data.prefixes"]
    problems = []
    if data.prefixes is not None:
        if not data.prefixes:
            problems.append("data.prefixes is empty: list at least one dataset prefix")
        if isinstance(data.weights, dict):
            problems.append(
                "data.weights is a mapping but data.prefixes is set: give a list with one weight per prefix"
            )
        elif data.weights is not None and len(data.weights) != len(data.prefixes):
            problems.append(
                f"data.weights has {len(data.weights)} entries for {len(data.prefixes)}"
                " data.prefixes: give one weight per prefix"
            )
    elif isinstance(data.weights, list):
        problems.append(
            "data.weights is a list but data.blend is set: give a mapping domain -> weight,"
            " e.g. {code: 2.0, prose: 1.0}"
        )
    weights = data.weights.values() if isinstance(data.weights, dict) else data.weights or []
    if any(w < 0 for w in weights) or (data.weights and sum(weights) <= 0):
        problems.append("data.weights must be >= 0 with a positive sum")
    shares = data.split.split(",")
    if len(shares) != 3 or not all(_is_number(s) and float(s) >= 0 for s in shares):
        problems.append(f"data.split={data.split!r} must be three shares train,valid,test, e.g. '99,1,0'")
    elif data.valid_blend is None:  # with a held-out blend the split is not used
        train_share, valid_share, _ = (float(s) for s in shares)
        if train_share == 0:
            problems.append(
                f"data.split={data.split!r} leaves nothing to train on: give the first share"
                " most of the data, e.g. data.split='99,1,0'"
            )
        elif valid_share == 0:  # evaluation runs every train.eval_interval steps and at the end
            problems.append(
                f"data.split={data.split!r} holds out no validation share and data.valid_blend"
                " is null: set data.split='99,1,0' or data.valid_blend to a held-out blend"
            )
    if data.tokenizer_model is None:
        problems.append("data.tokenizer_model is null: give the SentencePiece model the data was tokenized with")
    return problems


def _document_problems(cfg: Config) -> list[str]:
    problems = []
    if cfg.logging.weights_every is not None and cfg.reweight.unit == "document":
        problems.append(
            "logging.weights_every logs one weight per sequence, and reweight.unit=document weighs"
            " document segments: set logging.weights_every=null or reweight.unit=sequence"
        )
    if cfg.data.reset_attention_mask and cfg.model.transformer_impl == "transformer_engine":
        problems.append(
            "data.reset_attention_mask=true needs the local layer's SDPA attention, which builds each"
            " sample's document mask: set model.transformer_impl=local"
        )
    if cfg.data.reset_position_ids and cfg.model.position_embedding == "rope":
        problems.append(
            "data.reset_position_ids=true has no effect with model.position_embedding=rope (Megatron-Core's"
            " rotary embedding does not read position ids; RoPE is relative, so data.reset_attention_mask"
            " alone keeps documents apart): set data.reset_position_ids=false"
        )
    return problems


def _path_problems(cfg: Config) -> list[str]:
    """The checkpoint a run starts from and the cache it writes, checked before any rank starts."""
    problems = []
    load = cfg.checkpoint.load
    if load is not None and not Path(load).is_dir():
        what = "is not a directory" if Path(load).exists() else "does not exist"
        problems.append(
            f"checkpoint.load={load} {what}: point it at a checkpoint directory"
            " (e.g. RUN/checkpoints/step_1000) or set checkpoint.load=null"
        )
    if cfg.data.cache_dir is not None:
        why = _unwritable(Path(cfg.data.cache_dir))
        if why:
            problems.append(
                f"data.cache_dir={cfg.data.cache_dir}: {why}: set data.cache_dir to a writable"
                " directory, or null for <run_dir>/data_cache"
            )
    return problems


def _unwritable(path: Path) -> str:
    """Why the directory `path` cannot be made or written, or "". Tried with a temporary file
    in its nearest existing folder: permission bits say nothing for root or read-only mounts."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        return f"cannot write in {existing} ({error.strerror})"
    return ""
