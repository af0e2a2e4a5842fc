"""A small corpus of several files and two domains, and its tokenizer, for the sharded-run tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from data_prep.tokenizer import train_tokenizer

WORDS = "the of and to in is was for on that with as by at from data model train token loss".split()


def corpus(directory: Path, files: int) -> None:
    rng = random.Random(0)
    (directory / "corpus").mkdir()
    for index in range(files):
        with (directory / f"corpus/{index}.jsonl").open("w") as out:
            for _ in range(rng.randint(5, 60)):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
                out.write(json.dumps({"text": text, "meta": {"set": rng.choice(["web", "code"])}}) + "\n")
    with (directory / "tok.jsonl").open("w") as out:
        for _ in range(300):
            out.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(30))}) + "\n")
    train_tokenizer([str(directory / "tok.jsonl")], str(directory / "tok"), vocab_size=300)


def tokenize_arguments(directory: Path, prefix: str) -> list[str]:
    return [
        "--input",
        str(directory / "corpus"),
        "--tokenizer-model",
        str(directory / "tok.model"),
        "--output-prefix",
        str(directory / prefix),
        "--domain-key",
        "meta.set",
        "--workers",
        "1",
    ]
