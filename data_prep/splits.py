"""The train/validation split of `tokenize --valid-fraction F --split-seed S`, by document.

A document goes to validation when the blake2b hash of its text, keyed by the seed and read
as a fraction of 2**64, is below F. The side is a function of the text alone: identical texts
land on the same side, and the split does not depend on sharding, workers or file order.

Validation is written beside the training data under the same name with its final `train`
replaced by `valid` (data/train -> data/valid: data/valid_<domain>.bin/.idx, data/valid.blend.json),
the layout `launch.tools.study --data DIR` and `data.valid_blend` read.
"""

from __future__ import annotations

import hashlib
import os

from .errors import DataPrepError

TRAIN, VALID = "train", "valid"
MAX_SEED = 2**64 - 1  # the seed is the hash's 8-byte key


def split_names(valid_fraction: float | None) -> tuple[str, ...]:
    return (TRAIN, VALID) if valid_fraction else (TRAIN,)


def valid_prefix(output_prefix: str) -> str:
    """Where the validation datasets of `output_prefix` go: its name's final `train` -> `valid`."""
    directory, name = os.path.split(output_prefix)
    if not name.endswith(TRAIN):
        raise DataPrepError(
            f"--valid-fraction writes validation beside the training data, under the name of "
            f"--output-prefix with its final 'train' replaced by 'valid', so the name must end in "
            f"'train' (e.g. {os.path.join(directory, 'train')} -> {os.path.join(directory, 'valid')}); "
            f"{output_prefix!r} does not"
        )
    return os.path.join(directory, name.removesuffix(TRAIN) + VALID)


def sides(texts: list[str], fraction: float, seed: int) -> list[str]:
    """TRAIN or VALID for each text."""
    key = seed.to_bytes(8, "little")
    threshold = round(fraction * 2**64)
    return [
        VALID
        if int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, key=key).digest(), "little") < threshold
        else TRAIN
        for text in texts
    ]
