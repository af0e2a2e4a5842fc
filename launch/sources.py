"""What a run reads: the training mixture, the held-out sets, the tokenizer and the vocabulary.

One home for the run's data sources, so that the model (vocabulary size) and the datasets
(special tokens, prefixes, weights) see the same files, each opened once.  Blend files are
read with `data_prep.blend`, the module that writes them.

    check_files(cfg)                     # refuses missing or mismatched files, naming each
    sources = DataSources.open(cfg)      # once they are checked (the entry points do, first)
    sources.train, sources.valid         # Blend: prefixes, normalised weights, domain names
    sources.tokenizer                    # EOD, vocabulary size, decoding (SentencePiece or tokenizer.json)
    sources.padded_vocab_size            # the model's embedding rows
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from data_prep import tokenizer as data_prep_tokenizer
from data_prep.blend import BlendFile, BlendFileError, read_blend_file
from data_prep.errors import DataPrepError
from data_prep.files import file_sha256
from data_prep.indexed import verify_dataset
from launch.config import Config, ConfigError


class Blend(NamedTuple):
    """Datasets to mix: parallel lists, weights normalised to sum to 1."""

    prefixes: list[str]
    weights: list[float]
    domains: list[str]


@dataclass(frozen=True)
class Tokenizer:
    """What Megatron's GPTDataset, the model and the reports ask of a tokenizer: EOD, pad,
    vocabulary size, decoding. Plain values, so Megatron may copy the dataset config; the
    SentencePiece model or tokenizer.json is read through `data_prep.tokenizer`."""

    eod: int
    pad: int
    vocab_size: int
    model_file: str
    eos_token: str | None = None  # data.eos_token, for a tokenizer.json

    @classmethod
    def of(cls, cfg: Config) -> Tokenizer:
        """The run's tokenizer, data.tokenizer_model (ConfigError if it cannot end documents)."""
        return cls.from_model(cfg.data.tokenizer_model, cfg.data.eos_token)

    @classmethod
    @functools.cache  # one read of a model file per process
    def from_model(cls, model_file: str, eos_token: str | None = None) -> Tokenizer:
        loaded = _load_tokenizer(model_file, eos_token)
        # No pad id: Megatron masks the loss wherever the labels equal it, so a real id would
        # mask that token everywhere; it pads its last sample with -1, which it masks itself.
        return cls(eod=loaded.eos_id, pad=-1, vocab_size=loaded.vocab_size, model_file=model_file, eos_token=eos_token)

    @property
    def sha256(self) -> str:
        """What data_prep records in a blend: the hash of all the token ids depend on."""
        return _load_tokenizer(self.model_file, self.eos_token).sha256

    def decode(self, ids: list[int]) -> str:
        return _load_tokenizer(self.model_file, self.eos_token).decode(ids)

    @property
    def unique_identifiers(self) -> dict:
        """Part of the key of Megatron's cached sample indices."""
        return {"class": "SentencePieceSpecialTokens", "eod": self.eod, "pad": self.pad, "vocab_size": self.vocab_size}


@functools.cache
def _load_tokenizer(model_file: str, eos_token: str | None) -> data_prep_tokenizer.Tokenizer:
    try:
        return data_prep_tokenizer.load_tokenizer(model_file, eos_token)
    except DataPrepError as error:
        raise ConfigError(f"data.tokenizer_model: {error}") from None


@dataclass(frozen=True)
class DataSources:
    train: Blend
    valid: Blend | None  # None: data.split carves the held-out share out of the training files
    tokenizer: Tokenizer
    padded_vocab_size: int

    @classmethod
    def open(cls, cfg: Config) -> DataSources:
        """The sources of files `check_files` accepted: launch.pretrain checks them once per
        start, before any process group, so they are not checked again here."""
        tokenizer = Tokenizer.of(cfg)
        return cls(
            train=train_blend(cfg),
            valid=valid_blend(cfg),
            tokenizer=tokenizer,
            padded_vocab_size=padded_vocab_size(cfg, cfg.model.vocab_size or tokenizer.vocab_size),
        )


# --------------------------------------------------------------------------- blends


def read_blend(path: str, weights: dict[str, float] | None = None) -> Blend:
    """A data_prep blend file as a mixture; `weights` (domain -> weight) replaces its own.
    Domains weighted 0 are left out. Prefixes come back relative to the working directory."""
    blend = _read(path)
    if weights is not None:
        unknown = sorted(set(weights) - set(blend.domains))
        missing = sorted(set(blend.domains) - set(weights))
        if unknown or missing:
            raise ConfigError(
                f"data.weights must name each domain of {path} once: unknown {unknown},"
                f" missing {missing}; the domains are {', '.join(blend.domains)}"
            )
    chosen = {name: float(weights[name] if weights is not None else d.weight) for name, d in blend.domains.items()}
    chosen = {name: w for name, w in chosen.items() if w > 0}
    total = sum(chosen.values())
    return Blend(
        prefixes=[blend.dataset_prefix(name) for name in chosen],
        weights=[w / total for w in chosen.values()],
        domains=list(chosen),
    )


def _read(path: str) -> BlendFile:
    try:
        return read_blend_file(path)
    except BlendFileError as error:
        raise ConfigError(str(error)) from None


def train_blend(cfg: Config) -> Blend:
    """The training mixture: the blend file (optionally re-weighted by data.weights) or
    data.prefixes weighted by data.weights, else by their token counts (what concatenating
    them would give). Domains of plain prefixes are their file names."""
    data = cfg.data
    if data.blend is not None:
        return read_blend(data.blend, data.weights)
    if data.weights is not None:
        weights = [float(w) for w in data.weights]
    else:
        weights = [float(_token_count(prefix)) for prefix in data.prefixes]
    total = sum(weights)
    return Blend(
        prefixes=list(data.prefixes),
        weights=[w / total for w in weights],
        domains=[Path(p).name for p in data.prefixes],
    )


def _token_count(prefix: str) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)  # kept alive while read: its lengths view a memory map
    return int(dataset.sequence_lengths.sum())


def valid_blend(cfg: Config) -> Blend | None:
    """The held-out per-domain validation sets, or None (then data.split carves one out)."""
    return None if cfg.data.valid_blend is None else read_blend(cfg.data.valid_blend)


# --------------------------------------------------------------------------- vocabulary


def vocab_size(cfg: Config) -> int:
    """model.vocab_size, or the tokenizer's when it is null."""
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    if cfg.data.tokenizer_model is None or not Path(cfg.data.tokenizer_model).is_file():
        raise ConfigError(
            f"model.vocab_size is null and the tokenizer {cfg.data.tokenizer_model} is not"
            " there to read it from: set data.tokenizer_model or model.vocab_size"
        )
    return Tokenizer.of(cfg).vocab_size


def padded_vocab_size(cfg: Config, vocab: int) -> int:
    """Megatron's rule: round up to make_vocab_size_divisible_by * TP so that every
    tensor-parallel shard of the embedding has the same, well-aligned size."""
    multiple = cfg.model.make_vocab_size_divisible_by * cfg.parallel.tp
    return multiple * max(1, math.ceil(vocab / multiple))


# --------------------------------------------------------------------------- files


def check_files(cfg: Config) -> None:
    """Refuse a run whose data files are missing, unreadable or mismatched, listing each."""
    problems = file_problems(cfg)
    if problems:
        raise ConfigError("invalid data:\n  - " + "\n  - ".join(problems))


def file_problems(cfg: Config) -> list[str]:
    """Every missing, unreadable or mismatched data file, as messages; empty when all is well."""
    data = cfg.data
    problems = []
    blends = []
    for name, path in (("data.blend", data.blend), ("data.valid_blend", data.valid_blend)):
        if path is None:
            continue
        try:
            blend = read_blend(path, data.weights if name == "data.blend" else None)
            blends.append((name, _read(path)))
        except ConfigError as error:
            problems.append(f"{name}: {error}")
            continue
        problems += _missing_dataset_files(blend.prefixes, f"{name} {path}")
    if data.prefixes is not None:
        problems += _missing_dataset_files(data.prefixes, "data.prefixes")
    if data.tokenizer_model is not None and not Path(data.tokenizer_model).is_file():
        problems.append(
            f"data.tokenizer_model {data.tokenizer_model} not found: train one with"
            " `python -m data_prep train-tokenizer` or fix the path"
        )
    elif data.tokenizer_model is not None:
        try:
            tokenizer = Tokenizer.of(cfg)
        except ConfigError as error:
            return [*problems, str(error)]
        if cfg.model.vocab_size is not None and tokenizer.vocab_size > cfg.model.vocab_size:
            problems.append(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's"
                f" {tokenizer.vocab_size} tokens: set model.vocab_size=null to use the tokenizer's"
            )
        problems += [_tokenizer_mismatch(name, blend, tokenizer) for name, blend in blends]
    return [problem for problem in problems if problem]


def _tokenizer_mismatch(name: str, blend: BlendFile, tokenizer: Tokenizer) -> str:
    """A message when the blend's tokens came from another tokenizer (or EOS) than the configured one."""
    recorded = blend.tokenizer_sha256
    if recorded is None and blend.tokenizer_model and Path(blend.tokenizer_model).is_file():
        recorded = file_sha256(blend.tokenizer_model)  # an older blend file: compare the files
    if recorded is None or recorded == tokenizer.sha256:
        return ""
    return (
        f"{name} {blend.path} was tokenized with {blend.tokenizer_model}, whose content differs"
        f" from data.tokenizer_model {tokenizer.model_file} (the file, or a tokenizer.json's EOS):"
        " the token ids would mean other words;"
        f" set data.tokenizer_model to the blend's tokenizer or re-run `python -m data_prep tokenize`"
    )


def _missing_dataset_files(prefixes: list[str], source: str) -> list[str]:
    """Missing files, and datasets whose .bin and .idx disagree (a truncated copy, an empty
    dataset): found here in milliseconds rather than as a crash mid-run."""
    missing = [
        f"{prefix}{suffix}"
        for prefix in prefixes
        for suffix in (".bin", ".idx")
        if not Path(f"{prefix}{suffix}").is_file()
    ]
    if missing:
        return [f"{source}: missing {', '.join(missing)}: run `python -m data_prep tokenize` or fix the path"]
    problems = []
    for prefix in prefixes:
        try:
            verify_dataset(prefix)
        except DataPrepError as error:
            problems.append(f"{source}: {error}")
    return problems
