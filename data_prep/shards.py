"""Sharded runs: shard K of N tokenizes its share of the input files into `P.shards/K-of-N/`,
and `merge` puts all shards together into the datasets one unsharded run would write.

Every shard sees the whole input list and makes the same deterministic assignment from it,
so N array tasks need no coordination; the shards' runs record that list, and the merge
refuses shards that disagree on it or on any setting.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from .assemble import SETTINGS, finished_files, write_outputs
from .errors import DataPrepError
from .indexed import verify_dataset
from .lock import output_lock
from .outputs import OutputSet
from .splits import valid_prefix

SHARDS_SUFFIX = ".shards"
_SHARD_NAME = re.compile(r"(\d+)-of-(\d+)")


@dataclass(frozen=True)
class Shard:
    index: int  # from 0
    count: int

    def prefix(self, output_prefix: str) -> str:
        """P.shards/K-of-N/<name of P>: the shard's own output set, lock and stats."""
        return os.path.join(
            output_prefix + SHARDS_SUFFIX, f"{self.index}-of-{self.count}", os.path.basename(output_prefix)
        )


def shard_from(num_shards: int | None, shard_index: int | None, environ: Mapping[str, str]) -> Shard | None:
    """The shard given on the command line or, in a Slurm array task, the task's one."""
    if num_shards is None and shard_index is None:
        if "SLURM_ARRAY_TASK_COUNT" not in environ:
            return None
        count, task = int(environ["SLURM_ARRAY_TASK_COUNT"]), int(environ["SLURM_ARRAY_TASK_ID"])
        low, high = int(environ["SLURM_ARRAY_TASK_MIN"]), int(environ["SLURM_ARRAY_TASK_MAX"])
        if high - low + 1 != count:
            raise DataPrepError(
                f"this Slurm array's task ids ({low} to {high}, {count} tasks) are not one contiguous "
                f"range, so they do not name shards; submit it with --array=0-{count - 1}, or pass "
                "--num-shards and --shard-index"
            )
        return Shard(task - low, count)
    if num_shards is None or shard_index is None:
        raise DataPrepError("--num-shards and --shard-index go together; give both (or neither)")
    if not 0 <= shard_index < num_shards:
        raise DataPrepError(f"--shard-index must be from 0 to {num_shards - 1} for --num-shards {num_shards}")
    return Shard(shard_index, num_shards)


def assign_files(sizes: list[int], count: int) -> list[list[int]]:
    """Input file indices per shard, each shard's in input order: the largest files first, each
    to the shard with the fewest bytes so far (ties: lower shard), which keeps the shards
    within one file's size of each other. Depends only on the sizes and their order."""
    if count > len(sizes):
        raise DataPrepError(
            f"--num-shards {count} is more than the {len(sizes)} input files; use at most {len(sizes)} shards"
        )
    loads = [0] * count
    shards: list[list[int]] = [[] for _ in range(count)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        shard = min(range(count), key=lambda k: (loads[k], k))
        shards[shard].append(index)
        loads[shard] += sizes[index]
    return [sorted(files) for files in shards]


def merge(output_prefix: str, force: bool = False) -> tuple[dict, bool]:
    """One dataset per domain from all shards of `output_prefix`; (stats, fresh) as `tokenize`."""
    started = time.perf_counter()
    shards = _finished_shards(output_prefix)
    first = shards[0][1]
    run = {key: value for key, value in first["run"].items() if key != "shard"}
    located = {}
    for prefix, stats in shards:
        located.update(finished_files(stats, os.path.dirname(prefix)))
    missing = [identity[0] for identity in run["inputs"] if tuple(identity) not in located]
    if missing:
        raise DataPrepError(
            f"no shard holds {len(missing):,} of the input files (e.g. {missing[0]}); "
            "rerun the shards' tokenize command with --force"
        )
    with output_lock(output_prefix):
        outputs = OutputSet(output_prefix, (valid_prefix(output_prefix),) if run.get("valid_fraction") else ())
        previous = outputs.previous_run(run, force, SETTINGS)
        if previous is not None and previous["run"] == run:
            return previous, False
        try:
            header = {
                key: first[key]
                for key in ("tokenizer_model", "tokenizer_path", "eos_token", "vocab_size", "eos_id", "dtype")
            }
            files = [located[tuple(identity)] for identity in run["inputs"]]
            extra = {"merged_shards": len(shards)}
            stats = write_outputs(outputs, run, header, files, run["domain_key"] is not None, extra, started)
        except BaseException:
            outputs.abort()
            raise
    return stats, True


def _finished_shards(output_prefix: str) -> list[tuple[str, dict]]:
    """(prefix, stats) of every shard, in order; refuses, naming them, missing, unfinished or
    damaged shards, shards of another count, and shards of other inputs or settings."""
    directory = output_prefix + SHARDS_SUFFIX
    found = sorted(
        (int(match[2]), int(match[1]))
        for name in (os.listdir(directory) if os.path.isdir(directory) else [])
        if (match := _SHARD_NAME.fullmatch(name))
    )
    rerun = "rerun the tokenize command of the shards named (the same inputs and settings, with their --shard-index)"
    if not found:
        raise DataPrepError(
            f"no shards in {directory}/: run `python -m data_prep tokenize ... --output-prefix {output_prefix} "
            "--num-shards N --shard-index K` for each K first"
        )
    counts = sorted({count for count, _ in found})
    if len(counts) > 1:
        raise DataPrepError(
            f"{directory}/ holds shards of {' and '.join(map(str, counts))} shards in all; remove the folders "
            "of the sharding you do not want, then merge"
        )
    count = counts[0]
    shards = [Shard(index, count) for index in range(count)]
    problems, finished = [], []
    for shard in shards:
        prefix = shard.prefix(output_prefix)
        stats = OutputSet(prefix).finished_stats()
        name = os.path.dirname(prefix)
        if stats is None:
            state = "unfinished" if os.path.isdir(name) else "missing"
            problems.append(f"{name} ({state})")
            continue
        for dataset in stats["datasets"]:
            try:
                verify_dataset(os.path.join(os.path.dirname(prefix), dataset["prefix"]))
            except DataPrepError as error:
                problems.append(f"{name} (damaged: {error})")
        finished.append((prefix, stats))
    if problems:
        raise DataPrepError(f"cannot merge {count} shards: " + "; ".join(problems) + f"; {rerun}")
    reference = finished[0][1]["run"]
    for prefix, stats in finished[1:]:
        changed = sorted(key for key in ("inputs", *SETTINGS) if stats["run"].get(key) != reference.get(key))
        if changed:
            raise DataPrepError(
                f"{os.path.dirname(prefix)} was made with other {', '.join(changed)} than "
                f"{os.path.dirname(finished[0][0])}; {rerun}"
            )
    return finished
