"""Command line: `python -m data_prep {train-tokenizer,tokenize,merge,inspect} ...`."""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

from .errors import DataPrepError
from .inspect_dataset import inspect_dataset
from .readers import describe_skipped
from .shards import merge, shard_from
from .splits import MAX_SEED, valid_prefix
from .tokenize_corpus import TokenizeJob, default_workers, tokenize
from .tokenizer import train_tokenizer

DESCRIPTION = """\
Turn raw corpora (JSONL, optionally gzip/zstd compressed, or plain text) into a SentencePiece
tokenizer and Megatron-Core indexed datasets, one per domain if you like."""

EPILOG = """\
examples:
  python -m data_prep train-tokenizer --input data/raw --vocab-size 32000 --output-prefix data/tok
  python -m data_prep tokenize --input 'data/raw/*.jsonl.zst' --tokenizer-model data/tok.model \\
      --output-prefix data/train --domain-key meta.redpajama_set_name
  python -m data_prep inspect data/train

Run `python -m data_prep COMMAND --help` for each command's options."""

TRAIN_EPILOG = """\
The model keeps text exactly (identity normalization, whitespace kept, digits split) and has
byte fallback on, so any text round-trips. The same inputs and --seed give the same model.

examples:
  python -m data_prep train-tokenizer --input data/raw --vocab-size 32000 --output-prefix data/tok
  python -m data_prep train-tokenizer --input a.jsonl.zst b.jsonl.zst --vocab-size 8000 \\
      --model-type unigram --sample-docs 20000 --output-prefix data/tok8k"""

TOKENIZE_EPILOG = """\
Inputs are .jsonl or .txt files, each optionally compressed (.gz, .zst), directories (searched
recursively) or glob patterns (quote them). A JSONL line is a document with its text under
--json-key; in .txt files each line is a document. Every document becomes one sequence ending
with the tokenizer's EOS id. --tokenizer-model takes a SentencePiece .model or a Hugging Face
tokenizer.json, whose EOS is --eos-token or else the eos_token of the tokenizer_config.json beside it.

Bad lines (malformed JSON, missing or non-string key, invalid UTF-8, empty document):
  --on-error fail   stop at the first one, print file:line and the reason, exit 1, write nothing
  --on-error skip   skip and count them; the counts go to the summary and P.stats.json
A truncated .gz or .zst file fails the run in either mode.

A truncated, unreadable or vanished file fails (as does a bad line under --on-error fail),
but the other files are still tokenized; the run then exits 1, naming the failed files.

Each input file, once tokenized, is kept under P.incomplete/; the datasets are assembled from
them at the end and moved into place, P.stats.json last, so an interrupted run never leaves a
dataset that looks finished, and its rerun redoes only the files not finished. Rerunning a
finished run does nothing if the inputs and settings are the same, and tokenizes only the
files added or changed if only the inputs changed; other settings need --force, which
rebuilds everything. A second run on the same P while one is running refuses (the lock file
P.lock names the running one).

Validation: --valid-fraction F holds out the documents whose keyed hash (blake2b, key
--split-seed) of the text is below F, about F of them, whatever the sharding, workers or file
order; identical texts land on the same side. They are written beside P with the name's final
'train' replaced by 'valid' (data/train -> data/valid_<domain>.bin/.idx, data/valid.blend.json),
which `launch.tools.study --data data` and data.valid_blend read as they are.

Deduplication: --dedup exact drops each document whose exact text came earlier in input
order (within a file, across files, and across shards at the merge), counted per domain in
P.stats.json and the summary; each dataset X gets X.hashes (16 bytes a document).

Sharding: --num-shards N --shard-index K (K from 0; in a Slurm array task they default to
the task's place in the array) tokenizes shard K's share of the input files (balanced by
size) into P.shards/K-of-N/; `merge --output-prefix P` then writes the datasets an unsharded
run would, byte for byte. data_prep/slurm/submit.sh submits both as Slurm jobs.

examples:
  # one dataset: data/train.bin, data/train.idx, data/train.stats.json
  python -m data_prep tokenize --input corpus.jsonl --tokenizer-model data/tok.model \\
      --output-prefix data/train

  # SlimPajama: data/train_<domain>.bin/.idx per domain plus data/train.blend.json
  python -m data_prep tokenize --input 'slimpajama/train/**/*.jsonl.zst' \\
      --tokenizer-model data/tok.model --output-prefix data/train \\
      --domain-key meta.redpajama_set_name --on-error skip --workers 32

  # the same with 1% held out for validation: also data/valid_<domain>.bin/.idx, data/valid.blend.json
  python -m data_prep tokenize --input 'slimpajama/train/**/*.jsonl.zst' \\
      --tokenizer-model data/tok.model --output-prefix data/train \\
      --domain-key meta.redpajama_set_name --on-error skip --valid-fraction 0.01

  # the same in 4 shards (K = 0, 1, 2, 3, e.g. on 4 machines), then one dataset per domain
  python -m data_prep tokenize --input 'slimpajama/train/**/*.jsonl.zst' \\
      --tokenizer-model data/tok.model --output-prefix data/train \\
      --domain-key meta.redpajama_set_name --on-error skip --num-shards 4 --shard-index 0
  python -m data_prep merge --output-prefix data/train"""

MERGE_EPILOG = """\
The shards are P.shards/K-of-N/, each written by `tokenize ... --num-shards N --shard-index K`.
The merge refuses, naming them, shards that are missing, unfinished or damaged, and shards of
other inputs, settings or tokenizer. Its output (P.bin/.idx, or P_<domain>.bin/.idx and
P.blend.json, and P.stats.json) is byte-identical to what one unsharded run writes, and
written like one: staged, then moved into place, P.stats.json last.

example:
  python -m data_prep merge --output-prefix data/train"""

INSPECT_EPILOG = """\
examples:
  python -m data_prep inspect data/train
  python -m data_prep inspect data/train --samples 3 --max-chars 1000"""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except DataPrepError as exc:
        print(f"data_prep: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. an input deleted or moved while the run reads it (shared filesystems)
        print(f"data_prep: error: {exc.filename or 'a file'}: {exc.strerror or exc}; nothing written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "data_prep: interrupted; unfinished output removed, finished input files kept for the rerun",
            file=sys.stderr,
        )
        return 130


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m data_prep", description=DESCRIPTION, epilog=EPILOG, formatter_class=formatter
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train-tokenizer",
        help="train a SentencePiece model (P.model, P.vocab)",
        description="Train a SentencePiece model on a random sample of documents.",
        epilog=TRAIN_EPILOG,
        formatter_class=formatter,
    )
    train.add_argument(
        "--input", nargs="+", required=True, metavar="FILE_OR_DIR", help="input files, directories or glob patterns"
    )
    train.add_argument(
        "--vocab-size",
        type=_positive_int,
        required=True,
        metavar="N",
        help="pieces in the model, counting the 256 byte pieces and <unk>, <s>, </s>",
    )
    train.add_argument("--output-prefix", required=True, metavar="P", help="writes P.model and P.vocab")
    train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="(default: bpe)")
    train.add_argument(
        "--json-key",
        default="text",
        metavar="KEY",
        help="JSON field holding the text; dots reach into nested objects (default: text)",
    )
    train.add_argument(
        "--sample-docs",
        type=_positive_int,
        default=100_000,
        metavar="N",
        help="train on a uniform random sample of N documents (default: 100000)",
    )
    train.add_argument("--seed", type=int, default=0, help="sampling and training seed (default: 0)")
    train.set_defaults(run=_train_tokenizer)

    tok = commands.add_parser(
        "tokenize",
        help="tokenize corpora into Megatron indexed datasets (P.bin, P.idx)",
        description="Tokenize documents into Megatron-Core indexed datasets, one sequence per document.",
        epilog=TOKENIZE_EPILOG,
        formatter_class=formatter,
    )
    tok.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE_OR_DIR_OR_GLOB",
        help="input files, directories or glob patterns",
    )
    tok.add_argument(
        "--output-prefix",
        required=True,
        metavar="P",
        help="writes P.bin, P.idx, P.stats.json (with --domain-key: P_<domain>.bin/.idx "
        "and P.blend.json instead of P.bin/.idx)",
    )
    tok.add_argument(
        "--tokenizer-model", required=True, metavar="M", help="SentencePiece .model or Hugging Face tokenizer.json"
    )
    tok.add_argument(
        "--eos-token",
        metavar="TOKEN",
        help="for a tokenizer.json: the token that ends each document "
        "(default: eos_token of the tokenizer_config.json beside it)",
    )
    tok.add_argument(
        "--json-key",
        default="text",
        metavar="KEY",
        help="JSON field holding the text; dots reach into nested objects (default: text)",
    )
    tok.add_argument(
        "--domain-key",
        metavar="DOTTED.KEY",
        help="split by this JSON field (e.g. meta.redpajama_set_name): P_<domain>.bin/.idx "
        "per domain and P.blend.json with natural weights",
    )
    tok.add_argument(
        "--workers",
        type=_positive_int,
        default=default_workers(),
        metavar="N",
        help="encoding processes (default: the usable CPU cores, here %(default)s)",
    )
    tok.add_argument(
        "--on-error", choices=("fail", "skip"), default="fail", help="what to do with a bad input line (default: fail)"
    )
    tok.add_argument(
        "--force", action="store_true", help="replace existing outputs, even those of a finished identical run"
    )
    tok.add_argument(
        "--valid-fraction",
        type=_fraction,
        metavar="F",
        help="hold out about this fraction of the documents (chosen by a hash of each text) for "
        "validation, written beside P with its final 'train' replaced by 'valid': "
        "data/train -> data/valid_<domain>.bin/.idx and data/valid.blend.json",
    )
    tok.add_argument(
        "--split-seed",
        type=_seed,
        default=0,
        metavar="S",
        help="key of the split's hash: another seed holds out other documents (default: 0)",
    )
    tok.add_argument(
        "--dedup",
        choices=("exact",),
        help="drop each document whose exact text came earlier in input order (across files, "
        "and across shards at the merge), counted per domain in P.stats.json",
    )
    tok.add_argument(
        "--num-shards",
        type=_positive_int,
        metavar="N",
        help="split the input files into N shards (default: in a Slurm array task, the array's size)",
    )
    tok.add_argument(
        "--shard-index",
        type=int,
        metavar="K",
        help="tokenize shard K (0 to N-1) into P.shards/K-of-N/ (default: the Slurm array task's place)",
    )
    tok.set_defaults(run=_tokenize)

    join = commands.add_parser(
        "merge",
        help="merge the shards of a sharded tokenize run into one dataset per domain",
        description="Put the shards P.shards/K-of-N/ together into the datasets of one unsharded run.",
        epilog=MERGE_EPILOG,
        formatter_class=formatter,
    )
    join.add_argument("--output-prefix", required=True, metavar="P", help="the --output-prefix the shards were given")
    join.add_argument("--force", action="store_true", help="replace existing outputs of P")
    join.set_defaults(run=_merge)

    show = commands.add_parser(
        "inspect",
        help="summarise a tokenized dataset and decode a sample",
        description="Check that each dataset's .bin and .idx are complete, then show documents, tokens, "
        "length percentiles, per-domain counts and decoded samples.",
        epilog=INSPECT_EPILOG,
        formatter_class=formatter,
    )
    show.add_argument("prefix", metavar="P", help="dataset prefix given to tokenize --output-prefix")
    show.add_argument(
        "--tokenizer-model",
        metavar="M",
        help="SentencePiece .model or tokenizer.json to decode with (default: the one recorded in P.stats.json)",
    )
    show.add_argument("--samples", type=int, default=1, metavar="N", help="documents to decode (default: 1)")
    show.add_argument(
        "--max-chars", type=_positive_int, default=400, metavar="N", help="characters shown per document (default: 400)"
    )
    show.add_argument("--seed", type=int, default=0, help="which documents are sampled (default: 0)")
    show.set_defaults(run=_inspect)
    return parser


def _train_tokenizer(args: argparse.Namespace) -> int:
    summary = train_tokenizer(
        args.input,
        args.output_prefix,
        args.vocab_size,
        args.model_type,
        args.json_key,
        args.sample_docs,
        args.seed,
    )
    print(
        f"wrote {args.output_prefix}.model and .vocab: {args.model_type}, {args.vocab_size:,} pieces, "
        f"trained on {summary.lines:,} lines of {summary.sampled:,} sampled documents "
        f"(of {summary.documents:,})"
    )
    if summary.skipped:
        print(describe_skipped(summary.skipped))
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    shard = shard_from(args.num_shards, args.shard_index, os.environ)
    job = TokenizeJob(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer_model=args.tokenizer_model,
        eos_token=args.eos_token,
        json_key=args.json_key,
        domain_key=args.domain_key,
        on_error=args.on_error,
        workers=args.workers,
        force=args.force,
        shard=shard,
        valid_fraction=args.valid_fraction,
        split_seed=args.split_seed,
        dedup=args.dedup,
    )
    stats, fresh = tokenize(job)
    prefix = shard.prefix(args.output_prefix) if shard else args.output_prefix
    if shard:
        print(f"shard {shard.index} of {shard.count} (from 0): {stats['input_files']:,} input files into {prefix}")
    _report(prefix, stats, fresh)
    if fresh and stats["kept_files"]:
        print(
            f"{'kept':<16} {stats['kept_files']:,} input files finished before; tokenized {stats['tokenized_files']:,}"
        )
    if shard:
        print(
            f"{'next':<16} once all {shard.count} shards are done: "
            f"python -m data_prep merge --output-prefix {args.output_prefix}"
        )
    return 0


def _merge(args: argparse.Namespace) -> int:
    stats, fresh = merge(args.output_prefix, args.force)
    print(f"merged {stats.get('merged_shards', 0)} shards of {stats['input_files']:,} input files")
    _report(args.output_prefix, stats, fresh)
    return 0


def _report(prefix: str, stats: dict, fresh: bool) -> None:
    if not fresh:
        print(
            f"up to date: {prefix} was finished by a run with the same inputs and settings "
            f"({stats['documents']:,} documents, {stats['tokens']:,} tokens); pass --force to rebuild"
        )
        return
    directory = os.path.dirname(prefix)
    for dataset in stats["datasets"]:
        name = dataset["domain"] if dataset["domain"] is not None else "wrote"
        print(
            f"{name:<16} {os.path.join(directory, dataset['prefix'])}.{{bin,idx}}  "
            f"{dataset['documents']:>12,} documents {dataset['tokens']:>15,} tokens"
        )
    print(
        f"{'total':<16} {stats['documents']:,} documents, {stats['tokens']:,} tokens ({stats['dtype']}) "
        f"from {stats['input_bytes'] / 1e6:,.1f} MB in {stats['seconds']:.1f} s"
        + (f": {stats['tokens_per_second']:,} tokens/s" if "tokens_per_second" in stats else "")
    )
    if "duplicates" in stats:
        dropped = stats["duplicates"]
        per_domain = ", ".join(f"{domain} {count:,}" for domain, count in dropped.items() if domain and count)
        print(
            f"{'duplicates':<16} dropped {sum(dropped.values()):,} documents whose text came earlier"
            + (f" ({per_domain})" if per_domain else "")
        )
    skipped = Counter({kind: n for kind, n in stats["skipped"].items() if n})
    if skipped:
        print(f"{describe_skipped(skipped)} (first: {next(iter(stats['first_skipped'].values()))})")
    written = [f"{prefix}.stats.json"]
    if stats["run"]["domain_key"]:
        blends = [prefix, valid_prefix(prefix)] if stats["run"].get("valid_fraction") else [prefix]
        written[:0] = [f"{blend}.blend.json" for blend in blends]
    print(f"{'see':<16} {', '.join(written)}")


def _inspect(args: argparse.Namespace) -> int:
    print(inspect_dataset(args.prefix, args.tokenizer_model, args.samples, args.max_chars, args.seed))
    return 0


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_SEED}, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
