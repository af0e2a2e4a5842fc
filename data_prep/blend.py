"""The blend file `P.blend.json`: one dataset per domain, with its size and natural weight.

Written by `python -m data_prep tokenize --domain-key ...`; read by `data_prep inspect` and
by training (`data.blend`).  Dataset prefixes are stored relative to the blend file, so a
data directory can move as a whole.  The tokenizer's path and content hash are recorded so
that training can refuse a tokenizer other than the one the tokens came from.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

SUFFIX = ".blend.json"


class BlendFileError(ValueError):
    """A blend file that is missing or not in this format; the message names the file."""


@dataclass(frozen=True)
class Domain:
    prefix: str  # relative to the blend file
    documents: int
    tokens: int
    weight: float  # natural weight: the domain's share of all tokens


@dataclass(frozen=True)
class BlendFile:
    path: Path
    domains: dict[str, Domain]  # sorted by name
    tokenizer_model: str | None = None
    tokenizer_sha256: str | None = None

    def dataset_prefix(self, domain: str) -> str:
        """The domain's dataset prefix as a path usable from the working directory."""
        return str(self.path.parent / self.domains[domain].prefix)

    def to_json(self) -> dict:
        return {
            "tokenizer_model": self.tokenizer_model,
            "tokenizer_sha256": self.tokenizer_sha256,
            "domains": {name: asdict(domain) for name, domain in self.domains.items()},
        }


def read_blend_file(path: str | Path) -> BlendFile:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        domains = {
            str(name): Domain(
                prefix=str(entry["prefix"]),
                documents=int(entry["documents"]),
                tokens=int(entry["tokens"]),
                weight=float(entry["weight"]),
            )
            for name, entry in sorted(raw["domains"].items())
        }
    except FileNotFoundError:
        raise BlendFileError(f"blend file {path} not found: run `python -m data_prep tokenize`") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise BlendFileError(f"blend file {path} is not a data_prep blend ({error!r})") from None
    return BlendFile(path, domains, raw.get("tokenizer_model"), raw.get("tokenizer_sha256"))
