"""data_prep at corpus scale: shards and their merge, per-file resume, per-file stats, through
the real CLI (subprocesses) and real files; the reference is always one unsharded run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard
from helpers import REPO

from data_prep import bench
from data_prep.errors import DataPrepError
from data_prep.shards import assign_files, shard_from
from data_prep.tokenizer import train_tokenizer

WORDS = "the of and to in is was for on that with as by at from data model train token loss weight".split()
DOMAINS = ["RedPajamaC4", "RedPajamaGithub", "Red Pajama/Books"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("tokenizer")
    rng = random.Random(0)
    with (directory / "corpus.jsonl").open("w") as out:
        for _ in range(500):
            out.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(40))}) + "\n")
    train_tokenizer([str(directory / "corpus.jsonl")], str(directory / "tok"), vocab_size=300)
    return str(directory / "tok.model")


def write_corpus(
    directory: Path, files: int, seed: int = 0, bad_every: int = 0, documents: tuple[int, int] = (5, 120)
) -> list[Path]:
    """`files` JSONL files (some zstd) of uneven sizes, documents of three domains."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(files):
        lines = []
        for number in range(rng.randint(*documents)):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
            lines.append(json.dumps({"text": text, "meta": {"set": rng.choice(DOMAINS)}}))
            if bad_every and number % bad_every == bad_every - 1:
                lines.append("not json")
        data = ("\n".join(lines) + "\n").encode()
        path = directory / (f"part-{index:03d}.jsonl" + (".zst" if index % 3 == 0 else ""))
        path.write_bytes(zstandard.ZstdCompressor().compress(data) if path.suffix == ".zst" else data)
        paths.append(path)
    return paths


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=cwd, env=env, capture_output=True, text=True)


def tokenize_args(tokenizer: str, prefix: str, *more: str) -> list[str]:
    return [
        "tokenize",
        "--input",
        "corpus",
        "--tokenizer-model",
        tokenizer,
        "--output-prefix",
        prefix,
        "--domain-key",
        "meta.set",
        "--on-error",
        "skip",
        *more,
    ]


def outputs(directory: Path, base: str) -> dict[str, bytes]:
    """The datasets and blend file of prefix `base` (not the stats, which hold timings)."""
    return {
        path.name: path.read_bytes()
        for path in sorted(directory.glob(f"{base}*"))
        if path.suffix in (".bin", ".idx") or path.name.endswith(".blend.json")
    }


def assert_same_as_a_fresh_run(tmp_path: Path, tokenizer: str, prefix: str) -> None:
    fresh = run_cli(*tokenize_args(tokenizer, f"fresh/{prefix}"), cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert outputs(tmp_path, prefix) == outputs(tmp_path / "fresh", prefix)
    assert stats(tmp_path / prefix)["per_file"] == stats(tmp_path / "fresh" / prefix)["per_file"]


def stats(prefix: Path) -> dict:
    return json.loads(prefix.with_name(prefix.name + ".stats.json").read_text())


# ---------------------------------------------------------------- shards and merge


def test_four_shards_merged_are_byte_identical_to_one_run(tmp_path, tokenizer):
    write_corpus(tmp_path / "corpus", 9, bad_every=17)
    single = run_cli(*tokenize_args(tokenizer, "one/train", "--workers", "2"), cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    for index in range(4):  # each shard with its own worker count: the output must not care
        shard = run_cli(
            *tokenize_args(tokenizer, "four/train", "--num-shards", "4", "--shard-index", str(index)),
            "--workers",
            str(1 + index % 2),
            cwd=tmp_path,
        )
        assert shard.returncode == 0, shard.stderr
        assert (
            f"four/train.shards/{index}-of-4/train" in shard.stdout
            and "merge --output-prefix four/train" in shard.stdout
        )
    merged = run_cli("merge", "--output-prefix", "four/train", cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr

    expected = outputs(tmp_path / "one", "train")
    assert len(expected) == 2 * len(DOMAINS) + 1  # three domains' .bin/.idx and the blend file
    assert outputs(tmp_path / "four", "train") == expected
    one, four = stats(tmp_path / "one/train"), stats(tmp_path / "four/train")
    for key in ("run", "documents", "tokens", "skipped", "first_skipped", "datasets", "per_file"):
        assert four[key] == one[key], key
    # Every file in exactly one shard; the shards' bytes within one file's size of each other.
    shards = [stats(tmp_path / f"four/train.shards/{k}-of-4/train") for k in range(4)]
    held = sorted(record["input"][0] for shard in shards for record in shard["per_file"])
    assert held == sorted(record["input"][0] for record in one["per_file"])
    loads = [shard["input_bytes"] for shard in shards]
    assert max(loads) - min(loads) <= max(record["input"][1] for record in one["per_file"])

    again = run_cli("merge", "--output-prefix", "four/train", cwd=tmp_path)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_merge_refuses_missing_unfinished_and_mismatched_shards_naming_them(tmp_path, tokenizer):
    write_corpus(tmp_path / "corpus", 4)

    def shard(index: int, count: int = 3, *more: str) -> subprocess.CompletedProcess:
        args = tokenize_args(tokenizer, "p", "--num-shards", str(count), "--shard-index", str(index), *more)
        return run_cli(*args, "--workers", "1", cwd=tmp_path)

    assert shard(0).returncode == 0
    (tmp_path / "p.shards/1-of-3/p.incomplete").mkdir(parents=True)  # as a killed shard leaves it
    refused = run_cli("merge", "--output-prefix", "p", cwd=tmp_path)
    assert refused.returncode == 1
    assert "p.shards/1-of-3 (unfinished)" in refused.stderr and "p.shards/2-of-3 (missing)" in refused.stderr
    assert "p.shards/0-of-3" not in refused.stderr and not (tmp_path / "p.stats.json").exists()

    assert shard(1).returncode == 0
    assert shard(2, 3, "--json-key", "meta.set").returncode == 0  # other settings than shards 0 and 1
    refused = run_cli("merge", "--output-prefix", "p", cwd=tmp_path)
    assert refused.returncode == 1 and "p.shards/2-of-3 was made with other json_key" in refused.stderr

    assert shard(2, 3, "--force").returncode == 0
    assert shard(0, 2).returncode == 0  # a second sharding beside the first
    refused = run_cli("merge", "--output-prefix", "p", cwd=tmp_path)
    assert refused.returncode == 1 and "shards of 2 and 3 shards" in refused.stderr

    os.rename(tmp_path / "p.shards/0-of-2", tmp_path / "stale")
    assert run_cli("merge", "--output-prefix", "p", cwd=tmp_path).returncode == 0
    assert "Traceback" not in refused.stderr


def test_files_are_assigned_to_shards_by_size_deterministically():
    sizes = [50, 10, 10, 40, 30, 30, 20, 5]
    shards = assign_files(sizes, 3)
    assert shards == assign_files(sizes, 3)  # no randomness, no dependence on the shard asking
    assert sorted(i for shard in shards for i in shard) == list(range(len(sizes)))
    assert all(shard == sorted(shard) for shard in shards)  # input order within a shard
    loads = [sum(sizes[i] for i in shard) for shard in shards]
    # By hand, largest first to the lightest shard (ties: the lower): 50->0, 40->1, 30->2, 30->2,
    # 20->1, 10->0, 10->0, 5->1.
    assert shards == [[0, 1, 2], [3, 6, 7], [4, 5]] and loads == [70, 65, 60]
    with pytest.raises(DataPrepError, match="more than the 8 input files"):
        assign_files(sizes, 9)


def test_a_slurm_array_task_is_its_shard_and_other_arrays_are_refused():
    array = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "4"}
    assert shard_from(None, None, {**array, "SLURM_ARRAY_TASK_ID": "3"}) == shard_from(4, 2, {})
    assert shard_from(None, None, {}) is None
    assert shard_from(2, 1, {**array, "SLURM_ARRAY_TASK_ID": "3"}) == shard_from(2, 1, {})  # the flags win
    gaps = {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "6"}
    with pytest.raises(DataPrepError, match="not one contiguous range.*--array=0-2"):
        shard_from(None, None, {**gaps, "SLURM_ARRAY_TASK_ID": "6"})
    with pytest.raises(DataPrepError, match="go together"):
        shard_from(4, None, {})
    with pytest.raises(DataPrepError, match="from 0 to 3"):
        shard_from(4, 4, {})


def test_merge_memory_stays_flat_for_a_million_documents(tmp_path):
    """10^6 documents in 4 shards: Python lists of the lengths, offsets and document indices
    alone would take over 100 MB; the streamed merge stays near the interpreter's own size."""
    bench.write_synthetic_shards(str(tmp_path / "p"), 4, 10**6)
    peak_mb = bench.merge_peak_rss_mb(str(tmp_path / "p"))
    assert peak_mb < 100, peak_mb
    assert stats(tmp_path / "p")["documents"] == 10**6


# ---------------------------------------------------------------- resume


def test_a_killed_shard_redoes_only_the_files_not_finished(tmp_path, tokenizer):
    """SIGKILL of shard 0 of 2 mid-way; its rerun keeps the files it had finished, and the merge
    is still what one unsharded run writes."""
    write_corpus(tmp_path / "corpus", 12, documents=(300, 500))
    shard = [*tokenize_args(tokenizer, "out", "--workers", "1"), "--num-shards", "2", "--shard-index"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "data_prep", *shard, "0"], cwd=tmp_path, env=env)
    staging = tmp_path / "out.shards/0-of-2/out.incomplete"
    deadline = time.monotonic() + 60
    while len([p for p in staging.glob("parts/*") if p.is_dir() and "." not in p.name]) < 2:
        assert process.poll() is None, "the shard ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "out.shards/0-of-2/out.stats.json").exists()
    finished = len([p for p in staging.glob("parts/*") if p.is_dir() and "." not in p.name])

    rerun = run_cli(*shard, "0", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    done = stats(tmp_path / "out.shards/0-of-2/out")
    assert done["kept_files"] == finished and done["tokenized_files"] == done["input_files"] - finished > 0
    assert f"kept             {finished} input files finished before" in rerun.stdout
    assert not staging.exists()
    assert run_cli(*shard, "1", cwd=tmp_path).returncode == 0
    assert run_cli("merge", "--output-prefix", "out", cwd=tmp_path).returncode == 0
    assert_same_as_a_fresh_run(tmp_path, tokenizer, "out")


def test_a_failing_file_is_named_the_others_finish_and_the_fix_redoes_only_it(tmp_path, tokenizer):
    paths = write_corpus(tmp_path / "corpus", 6)
    broken = paths[3]  # a zstd file, cut short
    whole = broken.read_bytes()
    broken.write_bytes(whole[: len(whole) // 2])
    failed = run_cli(*tokenize_args(tokenizer, "out"), cwd=tmp_path)
    assert failed.returncode == 1
    assert f"corpus/{broken.name}: compressed stream ends early" in failed.stderr
    assert "the other 5 input files are finished" in failed.stderr and "no dataset written" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not any((tmp_path / name).exists() for name in ("out.stats.json", "out.blend.json"))
    assert not list(tmp_path.glob("out_*"))

    broken.write_bytes(whole)
    fixed = run_cli(*tokenize_args(tokenizer, "out"), cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    assert (stats(tmp_path / "out")["kept_files"], stats(tmp_path / "out")["tokenized_files"]) == (5, 1)
    assert_same_as_a_fresh_run(tmp_path, tokenizer, "out")


def test_adding_input_files_tokenizes_only_those(tmp_path, tokenizer):
    write_corpus(tmp_path / "corpus", 5)
    assert run_cli(*tokenize_args(tokenizer, "out"), cwd=tmp_path).returncode == 0
    (tmp_path / "more").mkdir()
    for path in write_corpus(tmp_path / "more", 2, seed=1):
        path.rename(tmp_path / "corpus" / f"new-{path.name}")
    added = run_cli(*tokenize_args(tokenizer, "out"), cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    assert (stats(tmp_path / "out")["kept_files"], stats(tmp_path / "out")["tokenized_files"]) == (5, 2)
    assert_same_as_a_fresh_run(tmp_path, tokenizer, "out")


# ---------------------------------------------------------------- per-file stats and progress


def test_stats_inspect_and_progress_show_each_file(tmp_path, tokenizer):
    paths = write_corpus(tmp_path / "corpus", 3, bad_every=10)
    run = run_cli(*tokenize_args(tokenizer, "out"), cwd=tmp_path, env={"DATA_PREP_PROGRESS_SECONDS": "0"})
    assert run.returncode == 0, run.stderr
    assert f"file 3 of 3 ({paths[2].name} 100%)" in run.stderr

    records = stats(tmp_path / "out")["per_file"]
    assert [record["input"][0] for record in records] == [str(path) for path in paths]
    for path, record in zip(paths, records):
        text = path.read_bytes()
        text = zstandard.ZstdDecompressor().decompressobj().decompress(text) if path.suffix == ".zst" else text
        lines = [line for line in text.decode().splitlines() if line != "not json"]
        assert record["documents"] == len(lines) == sum(documents for documents, _ in record["domains"].values())
        assert record["skipped"] == {"malformed_json": text.decode().splitlines().count("not json")}
    assert sum(record["tokens"] for record in records) == stats(tmp_path / "out")["tokens"]

    shown = run_cli("inspect", "out", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    for record in records:
        assert f"{os.path.basename(record['input'][0])}" in shown.stdout
        assert f"{record['documents']:>12,} {record['tokens']:>15,}" in shown.stdout
