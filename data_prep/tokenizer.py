"""SentencePiece models: training one on a sample of the corpus, loading one to tokenize with."""

from __future__ import annotations

import contextlib
import os
import random
from collections import Counter
from dataclasses import dataclass

import sentencepiece as spm

from .errors import DataPrepError
from .lock import output_lock
from .progress import progress
from .readers import describe_inputs, describe_skipped, expand_inputs, parse_chunk, read_chunks


def load_tokenizer(model_path: str) -> spm.SentencePieceProcessor:
    """Load a model that can end documents with EOS, or say what is wrong with it."""
    if not os.path.isfile(model_path):
        raise DataPrepError(
            f"tokenizer model {model_path!r} does not exist; train one with `python -m data_prep train-tokenizer`"
        )
    try:
        processor = spm.SentencePieceProcessor(model_file=model_path)
    except (OSError, RuntimeError) as exc:
        raise DataPrepError(f"{model_path!r} is not a SentencePiece model ({exc})") from exc
    if processor.eos_id() < 0:
        raise DataPrepError(
            f"{model_path!r} has no EOS piece (eos_id=-1), so documents cannot be terminated; "
            "use a model trained with an EOS piece (train-tokenizer keeps </s>)"
        )
    return processor


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
