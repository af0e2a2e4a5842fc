"""Tokenizers: training a SentencePiece model on a sample of the corpus; loading a SentencePiece
model or a Hugging Face tokenizer.json to tokenize with, behind one interface."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from .errors import DataPrepError
from .files import file_sha256
from .lock import output_lock
from .progress import progress
from .readers import describe_inputs, describe_skipped, expand_inputs, parse_chunk, read_chunks

TOKENIZER_CONFIG = "tokenizer_config.json"  # where a Hugging Face tokenizer names its special tokens


class Tokenizer(Protocol):
    """What data_prep and training ask of a tokenizer, whichever library encodes."""

    path: str
    eos_id: int
    vocab_size: int  # every id is below it

    def encode_documents(self, texts: list[str], dtype: np.dtype) -> list[list[np.ndarray]]:
        """Per document its ids, EOS last, as arrays of `dtype` to concatenate; one thread."""

    def decode(self, ids: list[int]) -> str: ...

    @property
    def sha256(self) -> str:
        """A hash of all that the ids depend on: blends and reruns compare it."""


def load_tokenizer(path: str, eos_token: str | None = None) -> Tokenizer:
    """A SentencePiece model, or a Hugging Face `tokenizer.json` (any `.json` file), that can
    end documents with EOS, or DataPrepError saying what is wrong with it."""
    if not os.path.isfile(path):
        raise DataPrepError(
            f"tokenizer model {path!r} does not exist; train one with `python -m data_prep train-tokenizer` "
            "or give a Hugging Face tokenizer.json"
        )
    if path.endswith(".json"):
        return HuggingFaceTokenizer(path, eos_token)
    if eos_token is not None:
        raise DataPrepError(
            f"an EOS token ({eos_token!r}) is given for the SentencePiece model {path!r}, which names its own: "
            "leave out --eos-token (data.eos_token), which is for a tokenizer.json"
        )
    return SentencePieceTokenizer(path)


class SentencePieceTokenizer:
    # SentencePiece needs about 35 bytes per character of the text it encodes at once (1.8 GB for
    # a 50 MB document), so documents longer than LONG_CHARS are encoded in pieces of at most
    # PIECE_CHARS characters (small pieces are also faster: 64 K encode 1.6x faster than 1 M).
    LONG_CHARS = 1 << 20
    PIECE_CHARS = 1 << 16

    def __init__(self, path: str):
        self.path = path
        try:
            self.processor = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as exc:
            raise DataPrepError(f"{path!r} is not a SentencePiece model ({exc})") from exc
        self.eos_id = self.processor.eos_id()
        self.vocab_size = self.processor.vocab_size()
        if self.eos_id < 0:
            raise DataPrepError(
                f"{path!r} has no EOS piece (eos_id=-1), so documents cannot be terminated; "
                "use a model trained with an EOS piece (train-tokenizer keeps </s>)"
            )

    @functools.cached_property
    def sha256(self) -> str:
        return file_sha256(self.path)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)

    def encode_documents(self, texts: list[str], dtype: np.dtype) -> list[list[np.ndarray]]:
        # One batch call for the ordinary documents: no Python call per document, and ids come
        # back as int32 buffers instead of lists of Python ints.
        short = [text for text in texts if len(text) <= self.LONG_CHARS]
        encoded = iter(self.processor.encode(short, add_eos=True, return_type="numpy", num_threads=1))
        return [[next(encoded)] if len(text) <= self.LONG_CHARS else self.encode_long(text, dtype) for text in texts]

    def encode_long(self, text: str, dtype: np.dtype) -> list[np.ndarray]:
        """The ids of a long document, encoded piece by piece in bounded memory.

        A piece ends before a space that follows a non-space character; the next piece starts with
        that space and is encoded without the dummy prefix, so each piece is normalized to exactly
        its part of the whole document's normalized text. The ids are then those of the whole
        document wherever no vocabulary piece holds a non-space character followed by "▁", as with
        SentencePiece's training defaults (split_by_whitespace=true, treat_whitespace_as_suffix=false)
        that train-tokenizer uses: BPE never merges across such a cut. A unigram model's best
        segmentation is cut there too, but its Viterbi search sums float scores over the text it is
        given, so where two segmentations score (nearly) alike, pieces and the whole document can
        choose differently (e.g. 12+8 vs 8+12 spaces): other tokens, the same text.
        Where PIECE_CHARS characters hold no such space, the piece is cut at its end: the tokens
        next to that cut can differ from whole-document encoding (nothing is merged across it),
        though they still decode to the same text with a model that keeps whitespace.
        """
        arrays = []
        processor, start = self.processor, 0
        while start < len(text):
            end = self._piece_end(text, start)
            ids = processor.encode(text[start:end], add_eos=end == len(text), return_type="numpy")
            arrays.append(ids.astype(dtype, casting="unsafe"))  # halves what waits for the next pieces
            processor, start = self._continuation_processor, end
        return arrays

    def _piece_end(self, text: str, start: int) -> int:
        end = start + self.PIECE_CHARS
        if end >= len(text):
            return len(text)
        cut = text.rfind(" ", start + 1, end)
        while cut > start and text[cut - 1].isspace():
            cut = text.rfind(" ", start + 1, cut)
        return cut if cut > start else end

    @functools.cached_property
    def _continuation_processor(self) -> spm.SentencePieceProcessor:
        """The model without the dummy prefix ("▁" put before the text), for pieces after
        the first. A model that removes extra whitespace strips the space a piece starts with, so
        there the dummy prefix stays: it puts back the "▁" that the whole document has there (and
        adds one at a cut that is not before a space)."""
        model = sentencepiece_model_pb2.ModelProto.FromString(self.processor.serialized_model_proto())
        model.normalizer_spec.add_dummy_prefix = model.normalizer_spec.remove_extra_whitespaces
        return spm.SentencePieceProcessor(model_proto=model.SerializeToString())


class HuggingFaceTokenizer:
    """A `tokenizers` tokenizer.json (GPT-2's byte-level BPE, Llama 3's, ...). Its EOS is the
    one given, else the eos_token of the tokenizer_config.json saved beside it."""

    def __init__(self, path: str, eos_token: str | None = None):
        from tokenizers import Tokenizer as HuggingFace

        self.path = path
        try:
            self.tokenizer = HuggingFace.from_file(path)
        except Exception as exc:  # the library raises a bare Exception for any unreadable file
            raise DataPrepError(f"{path!r} is not a Hugging Face tokenizer.json ({exc})") from exc
        # Text that spells a special token ("<|endoftext|>" in a web page) stays text, as in
        # SentencePiece: only data_prep puts EOS into the data, at document ends.
        self.tokenizer.encode_special_tokens = True
        self.eos_token = eos_token if eos_token is not None else _configured_eos(path)
        eos_id = self.tokenizer.token_to_id(self.eos_token)
        if eos_id is None:
            raise DataPrepError(
                f"the EOS token {self.eos_token!r} is not in the vocabulary of {path!r}; "
                "name one of its tokens with --eos-token (data.eos_token in training)"
            )
        self.eos_id = eos_id
        self.vocab_size = max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @functools.cached_property
    def sha256(self) -> str:
        # The EOS is part of the ids: the same tokenizer.json with another EOS gives other data.
        return hashlib.sha256(f"{file_sha256(self.path)} eos {self.eos_id}".encode()).hexdigest()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def encode_documents(self, texts: list[str], dtype: np.dtype) -> list[list[np.ndarray]]:
        # The fast batch call skips offsets; no special tokens are added (no BOS): EOS only.
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        eos = [self.eos_id]
        return [[np.array(encoding.ids + eos, dtype)] for encoding in encodings]


def _configured_eos(path: str) -> str:
    config_path = os.path.join(os.path.dirname(path), TOKENIZER_CONFIG)
    try:
        with open(config_path, encoding="utf-8") as file:
            eos = json.load(file).get("eos_token")
    except FileNotFoundError:
        eos = None
    except (OSError, ValueError, AttributeError) as exc:
        raise DataPrepError(f"{config_path} is not a readable tokenizer config ({exc})") from exc
    if isinstance(eos, dict):  # saved as an AddedToken: {"content": "</s>", ...}
        eos = eos.get("content")
    if not isinstance(eos, str):
        raise DataPrepError(
            f"{path!r} names no EOS token to end documents with: give it with --eos-token TOKEN "
            f"(data.eos_token in training), or save an eos_token in {config_path}"
        )
    return eos


@dataclass
class TrainingSummary:
    documents: int
    sampled: int
    lines: int
    skipped: Counter


def train_tokenizer(
    inputs: list[str],
    output_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    json_key: str = "text",
    sample_docs: int = 100_000,
    seed: int = 0,
) -> TrainingSummary:
    """Train on a uniform random sample of documents; writes `output_prefix.{model,vocab}`.

    The text is kept exactly (identity normalization, no whitespace folding) and byte fallback
    is on, so decode(encode(text)) == text for any text, code indentation included. The
    sample and the trainer are seeded, so the same inputs and seed give the same model.
    """
    paths = expand_inputs(inputs)
    with output_lock(output_prefix):  # two runs would train into the same temporary files
        sample, documents, skipped = _reservoir_sample(paths, json_key, sample_docs, random.Random(seed))
        if not sample:
            found = f"; {describe_skipped(skipped)}" if skipped else ""
            raise DataPrepError(f"no documents to train on in {describe_inputs(paths)}{found}")
        # SentencePiece trains on lines (it drops "sentences" over 4 kB), so feed lines, not documents.
        lines = [line for text in sample for line in text.split("\n") if line.strip()]

        partial = output_prefix + ".incomplete"
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_prefix=partial,
                model_type=model_type,
                vocab_size=vocab_size,
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
            os.replace(partial + ".vocab", output_prefix + ".vocab")
            os.replace(partial + ".model", output_prefix + ".model")  # the model last: it is the result
        except (RuntimeError, ValueError) as exc:
            raise DataPrepError(
                f"SentencePiece could not train a {vocab_size}-piece {model_type} model on "
                f"{len(lines):,} lines from {len(sample):,} documents: {exc}\n"
                "Change --vocab-size (byte fallback needs room for 256 byte pieces plus the "
                "characters of the text) or give more text (--sample-docs, more inputs)."
            ) from exc
        finally:
            for suffix in (".model", ".vocab"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(partial + suffix)
        return TrainingSummary(documents, len(sample), len(lines), skipped)


def _reservoir_sample(paths: list[str], json_key: str, size: int, rng: random.Random) -> tuple[list[str], int, Counter]:
    """Uniform sample of `size` documents in one pass and bounded memory (algorithm R)."""
    sample: list[str] = []
    seen = 0
    skipped: Counter = Counter()
    total_bytes = sum(os.path.getsize(path) for path in paths)
    with progress(total_bytes, "sampling") as bar:
        for path in paths:
            done_before = bar.n
            for chunk, position in read_chunks(path):
                parsed = parse_chunk(chunk, json_key, None, stop_at_first_bad=False)
                skipped.update(parsed.skipped)
                for text in parsed.texts:
                    if seen < size:
                        sample.append(text)
                    else:
                        slot = rng.randrange(seen + 1)
                        if slot < size:
                            sample[slot] = text
                    seen += 1
                bar.update(done_before + position - bar.n)
    return sample, seen, skipped
