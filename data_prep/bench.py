"""Benchmark: `python -m data_prep.bench [--workers 2] [--size-mb 32]`.

Measures, side by side on one generated corpus (Python standard library sources and pydoc
topics as JSONL, made in a temporary directory) and one tokenizer trained on it:

* the limit: SentencePiece's own batch encoding of the documents, already decoded in memory,
  with as many threads as workers (no reading, parsing or writing);
* `data_prep tokenize` end to end (reading, parsing, encoding, writing the dataset);
* a Megatron-LM `tools/preprocess_data.py`-style pipeline (see `megatron_lm_style_preprocess`);
* the same limit and `data_prep tokenize` with a GPT-2-style byte-level BPE `tokenizer.json` of
  the same vocabulary size, trained with Hugging Face `tokenizers` on the same sample size.

Each is run `--repeats` times and the best time kept (other work on the machine only ever
slows a run down). The SentencePiece datasets must be byte-identical, and the tokenizer.json
dataset's tokens those of its limit; the exit status says whether.

Then the scale-out: the corpus cut into 8 files, tokenized as 1 shard and as `--shards` shard
processes at once (1 worker each), merged, and compared with one unsharded run; and the merge
of 10^7 synthetic documents in 4 shards, with its peak memory.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import multiprocessing
import os
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from collections import Counter

import numpy as np
import sentencepiece as spm

from .assemble import SETTINGS, FileOutput, file_record, write_outputs
from .indexed import IndexedDatasetWriter
from .outputs import OutputSet
from .shards import Shard, merge
from .splits import TRAIN
from .tokenize_corpus import TokenizeJob, default_workers, tokenize
from .tokenizer import TOKENIZER_CONFIG, load_tokenizer, train_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.bench",
        description=__doc__.split("\n", 1)[1],
        epilog="example: python -m data_prep.bench --workers 2 --size-mb 32 --model-type unigram",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workers", type=int, default=2, metavar="N", help="worker processes, and threads for the limit (default: 2)"
    )
    parser.add_argument(
        "--size-mb", type=float, default=32, metavar="MB", help="corpus size in MB of text (default: 32)"
    )
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="(default: bpe)")
    parser.add_argument("--vocab-size", type=int, default=16000, metavar="N", help="(default: 16000)")
    parser.add_argument(
        "--repeats", type=int, default=3, metavar="N", help="runs of each pipeline, best kept (default: 3)"
    )
    parser.add_argument(
        "--shards", type=int, default=2, metavar="N", help="shard processes run at once, beside 1 (default: 2)"
    )
    args = parser.parse_args(argv)
    # The tokenizer.json limit runs on as many threads as workers; set before the library's first
    # use. Set explicitly, so the workers forked after it start without the library's warning.
    os.environ.update(RAYON_NUM_THREADS=str(args.workers), TOKENIZERS_PARALLELISM="true")
    IndexedDataset = megatron_indexed_dataset().IndexedDataset  # slow import, outside timing

    with tempfile.TemporaryDirectory(prefix="data_prep_bench_") as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        documents = write_corpus(corpus, int(args.size_mb * 1e6))
        model = os.path.join(tmp, "tok")
        train_tokenizer([corpus], model, args.vocab_size, args.model_type, sample_docs=2000)
        model += ".model"
        with open(corpus, encoding="utf-8") as lines:
            texts = [json.loads(line)["text"] for line in lines]
        processor = spm.SentencePieceProcessor(model_file=model)
        sample = random.Random(0).sample(texts, min(2000, len(texts)))
        hf_model = train_gpt2_style_tokenizer(sample, args.vocab_size, os.path.join(tmp, "hf"))
        hf_tokenizer = load_tokenizer(hf_model)
        hf_raw_ids: list[np.ndarray] = []

        def raw_encode() -> int:
            encoded = processor.encode(texts, add_eos=True, return_type="numpy", num_threads=args.workers)
            return sum(map(len, encoded))

        def data_prep() -> int:
            job = TokenizeJob([corpus], os.path.join(tmp, "data_prep"), model, workers=args.workers, force=True)
            return tokenize(job)[0]["tokens"]

        def baseline() -> int:
            return megatron_lm_style_preprocess(corpus, model, os.path.join(tmp, "megatron"), args.workers)

        def hf_raw_encode() -> int:
            encodings = hf_tokenizer.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
            hf_raw_ids[:] = [np.array(encoding.ids + [hf_tokenizer.eos_id], np.uint16) for encoding in encodings]
            return sum(map(len, hf_raw_ids))

        def hf_data_prep() -> int:
            job = TokenizeJob([corpus], os.path.join(tmp, "hf_data_prep"), hf_model, workers=args.workers, force=True)
            return tokenize(job)[0]["tokens"]

        pipelines = {
            "raw": raw_encode,
            "data_prep": data_prep,
            "baseline": baseline,
            "hf_raw": hf_raw_encode,
            "hf_data_prep": hf_data_prep,
        }
        timings = {name: [] for name in pipelines}
        tokens = {}
        for _ in range(args.repeats):
            for name, run in pipelines.items():
                started = time.perf_counter()
                tokens[name] = run()
                timings[name].append(time.perf_counter() - started)

        identical = (
            all(
                filecmp.cmp(
                    os.path.join(tmp, "data_prep" + suffix), os.path.join(tmp, "megatron" + suffix), shallow=False
                )
                for suffix in (".bin", ".idx")
            )
            and tokens["raw"] == tokens["data_prep"] == tokens["baseline"]
        )
        hf_identical = np.array_equal(
            np.fromfile(os.path.join(tmp, "hf_data_prep.bin"), np.uint16), np.concatenate(hf_raw_ids)
        )
        readable = all(len(IndexedDataset(os.path.join(tmp, n))) == documents for n in ("data_prep", "hf_data_prep"))
        sharded = shard_scaling(corpus, model, tmp, args.shards, args.workers)
        merge_documents = 10**7
        write_synthetic_shards(os.path.join(tmp, "synthetic"), 4, merge_documents)
        started = time.perf_counter()
        merge_rss = merge_peak_rss_mb(os.path.join(tmp, "synthetic"))
        merge_seconds = time.perf_counter() - started

    best = {name: min(times) for name, times in timings.items()}
    speed = {name: tokens[name] / best[name] for name in best}
    cpus = default_workers()
    print(
        f"corpus: {args.size_mb:g} MB of text as JSONL, {documents:,} documents, {tokens['raw']:,} tokens "
        f"({tokens['hf_raw']:,} with the tokenizer.json); SentencePiece {args.model_type} and byte-level BPE "
        f"tokenizer.json, {args.vocab_size:,} tokens each; {args.workers} workers on {cpus} usable CPUs; "
        f"best of {args.repeats}\n"
    )
    rows = [
        (f"SentencePiece batch encode, {args.workers} threads (limit)", "raw", "raw"),
        (f"data_prep tokenize, {args.workers} workers", "data_prep", "raw"),
        (f"Megatron-LM preprocess_data-style, {args.workers} workers", "baseline", "raw"),
        (f"tokenizer.json batch encode, {args.workers} threads (limit)", "hf_raw", "hf_raw"),
        (f"data_prep tokenize, tokenizer.json, {args.workers} workers", "hf_data_prep", "hf_raw"),
    ]
    print(f"| {'pipeline':<52} | {'seconds':>7} | {'tokens/s':>10} | {'of limit':>8} |")
    print(f"|{'-' * 54}|{'-' * 8}:|{'-' * 11}:|{'-' * 9}:|")
    for label, name, limit in rows:
        print(f"| {label:<52} | {best[name]:>7.2f} | {speed[name]:>10,.0f} | {speed[name] / speed[limit]:>8.0%} |")
    print(
        f"\ndata_prep / limit: {speed['data_prep'] / speed['raw']:.0%} (tokenizer.json: "
        f"{speed['hf_data_prep'] / speed['hf_raw']:.0%}); "
        f"speed-up over the Megatron-LM-style baseline: {speed['data_prep'] / speed['baseline']:.2f}x; "
        f"identical tokens: {'yes' if identical and hf_identical else 'NO'}; "
        f"readable by IndexedDataset: {'yes' if readable else 'NO'}"
    )
    one = sharded["runs"][1]
    print(
        f"\nshards at once, each `tokenize --num-shards N --shard-index K --workers 1` on "
        f"{SHARD_FILES} files of the corpus, then `merge`; {cpus} usable CPUs, best of 1:\n"
    )
    print(f"| {'run':<52} | {'seconds':>7} | {'tokens/s':>10} | {'speed-up':>8} |")
    print(f"|{'-' * 54}|{'-' * 8}:|{'-' * 11}:|{'-' * 9}:|")
    for count, seconds in sharded["runs"].items():
        label = f"{count} shard{'s' if count > 1 else ''} at once, 1 worker each"
        print(f"| {label:<52} | {seconds:>7.2f} | {sharded['tokens'] / seconds:>10,.0f} | {one / seconds:>7.2f}x |")
    print(
        f"\nmerge of the {args.shards} shards: {sharded['merge_seconds']:.2f} s; identical to one unsharded run: "
        f"{'yes' if sharded['identical'] else 'NO'}\n"
        f"merge of {merge_documents:,} documents in 4 shards: {merge_seconds:.1f} s, peak memory {merge_rss:.0f} MB"
    )
    return 0 if identical and hf_identical and readable and sharded["identical"] else 1


def megatron_indexed_dataset():
    """Megatron-Core's indexed_dataset module, without the warnings its import raises that
    Transformer Engine and Apex are absent: true on a CPU machine, and nothing this module
    (files only) uses. data_prep imports nothing from launch, so it filters them here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Transformer Engine and Apex are not installed", UserWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def train_gpt2_style_tokenizer(texts: list[str], vocab_size: int, directory: str) -> str:
    """A GPT-2-style tokenizer.json (byte-level BPE, GPT-2's pre-tokenizer, <|endoftext|>) trained
    on `texts`, with a tokenizer_config.json naming its EOS, in `directory`; returns its path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    tokenizer.save(path)
    with open(os.path.join(directory, TOKENIZER_CONFIG), "w") as config:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}, config)
    return path


SHARD_FILES = 8
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `-m data_prep` imports from


def shard_scaling(corpus: str, model: str, tmp: str, shards: int, workers: int) -> dict:
    """Wall time of 1 and of `shards` shard processes run at once over the corpus cut into
    SHARD_FILES files, the merge's time, and whether the merge equals one unsharded run."""
    directory = os.path.join(tmp, "files")
    os.makedirs(directory)
    with open(corpus, encoding="utf-8") as lines:
        texts = lines.readlines()
    for index in range(SHARD_FILES):
        with open(os.path.join(directory, f"{index}.jsonl"), "w", encoding="utf-8") as out:
            out.writelines(texts[index * len(texts) // SHARD_FILES : (index + 1) * len(texts) // SHARD_FILES])
    reference = TokenizeJob([directory], os.path.join(tmp, "unsharded"), model, workers=workers)
    tokens = tokenize(reference)[0]["tokens"]
    runs = {}
    for count in sorted({1, shards}):
        prefix = os.path.join(tmp, f"sharded{count}")
        command = [sys.executable, "-m", "data_prep", "tokenize", "--input", directory, "--tokenizer-model", model]
        command += ["--output-prefix", prefix, "--workers", "1", "--num-shards", str(count)]
        started = time.perf_counter()
        processes = [
            subprocess.Popen([*command, "--shard-index", str(k)], cwd=_ROOT, stdout=subprocess.DEVNULL)
            for k in range(count)
        ]
        if any(process.wait() for process in processes):
            raise RuntimeError(f"a shard of {count} failed")
        runs[count] = time.perf_counter() - started
    started = time.perf_counter()
    merge(prefix)
    merge_seconds = time.perf_counter() - started
    identical = all(
        filecmp.cmp(os.path.join(tmp, "unsharded" + suffix), prefix + suffix, shallow=False)
        for suffix in (".bin", ".idx")
    )
    return {"tokens": tokens, "runs": runs, "merge_seconds": merge_seconds, "identical": identical}


def write_corpus(path: str, size_bytes: int) -> int:
    """JSONL of ~4 kB documents from the standard library's sources and pydoc topics, repeated
    as needed to reach `size_bytes` of text; the domain is in meta.redpajama_set_name."""
    documents = 0
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        while written < size_bytes:
            for text, domain in _stdlib_documents():
                out.write(json.dumps({"text": text, "meta": {"redpajama_set_name": domain}}) + "\n")
                documents += 1
                written += len(text.encode("utf-8"))
                if written >= size_bytes:
                    break
    return documents


def _stdlib_documents():
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name], "python-docs"
    root = sysconfig.get_paths()["stdlib"]
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d != "site-packages")
        domain = "python-tests" if f"{os.sep}test" in directory[len(root) :] else "python-stdlib"
        for name in sorted(names):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(directory, name), encoding="utf-8") as source:
                    text = source.read()
            except (UnicodeDecodeError, OSError):
                continue
            yield from ((piece, domain) for piece in _split(text, 4000))


def _split(text: str, size: int):
    """Pieces of about `size` characters, cut at blank lines."""
    piece: list[str] = []
    length = 0
    for line in text.splitlines(keepends=True):
        piece.append(line)
        length += len(line)
        if length >= size and not line.strip():
            yield "".join(piece)
            piece, length = [], 0
    if "".join(piece).strip():
        yield "".join(piece)


# ---------------------------------------------------------------- baseline

_baseline_processor: spm.SentencePieceProcessor | None = None


class _MegatronStyleEncoder:
    """Per-worker tokenizer and per-line encoding, like preprocess_data.py's `Encoder`."""

    def __init__(self, model_path: str, json_key: str):
        self.model_path, self.json_key = model_path, json_key

    def initializer(self) -> None:
        global _baseline_processor
        _baseline_processor = spm.SentencePieceProcessor(model_file=self.model_path)

    def encode(self, json_line: str) -> tuple[list[int], int]:
        text = json.loads(json_line)[self.json_key]
        ids = _baseline_processor.encode_as_ids(text)
        if ids:  # --append-eod
            ids.append(_baseline_processor.eos_id())
        return ids, len(json_line)


def megatron_lm_style_preprocess(input_path: str, model_path: str, output_prefix: str, workers: int) -> int:
    """Reproduces the structure of Megatron-LM's `tools/preprocess_data.py` (GPTSentencePiece
    tokenizer, --append-eod, one JSON key), which ships only in the Megatron-LM repository:
    `multiprocessing.Pool.imap` with chunksize 25 over the file's lines, `json.loads` and a
    per-document encode in each worker, and `IndexedDatasetBuilder.add_item` + `end_document`
    per document in the parent. Returns the number of tokens written."""
    import torch

    indexed_dataset = megatron_indexed_dataset()
    vocab_size = spm.SentencePieceProcessor(model_file=model_path).vocab_size()
    encoder = _MegatronStyleEncoder(model_path, "text")
    tokens = 0
    with open(input_path, encoding="utf-8") as lines:
        pool = multiprocessing.Pool(workers, initializer=encoder.initializer)
        encoded_docs = pool.imap(encoder.encode, lines, 25)
        builder = indexed_dataset.IndexedDatasetBuilder(
            output_prefix + ".bin", dtype=indexed_dataset.DType.optimal_dtype(vocab_size)
        )
        for ids, _ in encoded_docs:
            builder.add_item(torch.IntTensor(ids))
            builder.end_document()
            tokens += len(ids)
        builder.finalize(output_prefix + ".idx")
        pool.close()
        pool.join()
    return tokens


# ---------------------------------------------------------------- merge memory


def write_synthetic_shards(output_prefix: str, shards: int, documents: int, seed: int = 0) -> None:
    """`shards` finished shards of `output_prefix` holding `documents` short documents in all,
    as if tokenized from one input file each, written by the same code as a real shard."""
    rng = np.random.default_rng(seed)
    inputs = [[f"/synthetic/{k}.jsonl", documents // shards, 0] for k in range(shards)]
    run = {"inputs": inputs, "tokenizer_sha256": "0" * 64, "json_key": "text", "domain_key": None, "on_error": "fail"}
    header = {"tokenizer_model": "synthetic.model", "tokenizer_path": "/synthetic.model", "vocab_size": 400}
    header |= {"eos_token": None, "eos_id": 2, "dtype": "uint16"}
    for index in range(shards):
        shard = Shard(index, shards)
        outputs = OutputSet(shard.prefix(output_prefix))
        outputs.previous_run({**run, "shard": [index, shards]}, True, SETTINGS)
        raw = os.path.join(outputs.staging, "raw")
        writer = IndexedDatasetWriter(raw, np.uint16)
        count = inputs[index][1]
        for start in range(0, count, 1 << 20):
            lengths = rng.integers(1, 8, min(1 << 20, count - start), dtype=np.int32)
            writer.append(rng.integers(0, 400, int(lengths.sum()), dtype=np.uint16), lengths)
        writer.finish()
        counts = {(TRAIN, ""): [writer.documents, writer.tokens]}
        record = file_record(inputs[index], count, Counter(), {}, counts, (TRAIN,))
        file = FileOutput(record, {(TRAIN, ""): (raw, 0, count)})  # staged: the commit removes it
        write_outputs(outputs, {**run, "shard": [index, shards]}, header, [file], False, {}, time.perf_counter())


def merge_peak_rss_mb(output_prefix: str) -> float:
    """Peak resident memory of `python -m data_prep merge --output-prefix P`: the merging
    process's own high-water mark (VmHWM; getrusage's would count the forking parent's)."""
    code = "import sys; from data_prep.cli import main; status = main(sys.argv[1:]); "
    code += "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]); sys.exit(status)"
    command = [sys.executable, "-c", code, "merge", "--output-prefix", os.path.abspath(output_prefix)]
    done = subprocess.run(command, cwd=_ROOT, check=True, capture_output=True, text=True)
    return int(done.stdout.split()[-1]) / 1024


if __name__ == "__main__":
    raise SystemExit(main())
