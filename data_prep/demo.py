"""Build the CPU demo data from text that every Python installation carries.

    python -m data_prep.demo --out data/demo

Five domains, written as JSONL with SlimPajama's domain field so that data_prep splits them
exactly as it splits SlimPajama:

    code         standard-library modules (.py sources)
    docs         docstrings of other standard-library modules, extracted with `ast`
    prose        the reference-manual topics that pydoc shows (`pydoc_data.topics`)
    licenses     licence texts of Python and of torch (with its bundled dependencies' ones)
    boilerplate  near-duplicate web-crawl junk (cookie banners, legal footers, subscribe
                 prompts): deliberately redundant, the low-loss data that loss-based
                 reweighting should learn to down-weight

The `web` variant (`--variant web`) is one web-like domain instead, in which short
redundant pages and informative ones are packed into the same training windows, as in a
crawl: the boilerplate pages above and the reference-manual topics cut into pages of at most
700 characters. Its validation blend has the `web` domain itself and each kind of page alone
(`web-informative`, `web-boilerplate`), and `train.kinds.json` names which documents of the
training set are of which kind (for `python -m launch.tools.report --weights RUN --kinds ...`).

Every domain keeps 5% of its documents (chosen by hash) for validation. Then data_prep
trains a 2048-token tokenizer and writes one indexed dataset per domain plus a blend file
for each split. The corpus is deterministic (sorted files, fixed seed, capped sizes: a few
MB) and the build is idempotent: a finished directory is left as it is.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import json
import math
import pydoc_data.topics
import random
import sysconfig
from pathlib import Path

from .blend import read_blend_file
from .files import replaced_atomically, write_text_atomically
from .tokenize_corpus import TokenizeJob, tokenize
from .tokenizer import train_tokenizer

SEED = 0
DOMAIN_KEY = "meta.redpajama_set_name"
VALID_FRACTION = 0.05
VOCAB_SIZE = 2048
CHUNK_CHARS = 4000  # long documents are cut into pieces of at most this many characters
BUDGET_CHARS = {  # per domain, so the whole corpus stays a few MB
    "code": 1_200_000,
    "docs": 500_000,
    "prose": 500_000,
    "licenses": 300_000,
    "boilerplate": 500_000,
}
# Parts of the standard library that are test data, generated tables or prose (not code).
SKIPPED_STDLIB_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "__pycache__",
    "encodings",
    "pydoc_data",
    "ensurepip",
    "lib2to3",
    "turtledemo",
}


# --------------------------------------------------------------------------- the domains


def chunk(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut at line boundaries into pieces of at most max_chars (a longer line is cut too)."""
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        for start in range(0, len(line), max_chars):
            part = line[start : start + max_chars]
            if len(current) + len(part) > max_chars:
                pieces.append(current)
                current = ""
            current += part
    pieces.append(current)
    return [piece.strip("\n") for piece in pieces if piece.strip()]


def take(documents, budget: int, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Documents (each cut into chunks) in order until `budget` characters are reached."""
    taken, used = [], 0
    for document in documents:
        for piece in chunk(document, max_chars):
            if used >= budget:
                return taken
            taken.append(piece)
            used += len(piece)
    return taken


def stdlib_modules() -> list[Path]:
    """Standard-library sources in a fixed shuffled order (sorted first, so it is reproducible)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(
        path for path in root.rglob("*.py") if not SKIPPED_STDLIB_DIRS & set(path.relative_to(root).parts[:-1])
    )
    random.Random(SEED).shuffle(paths)
    return paths


def read_source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def code_documents(modules: list[Path]):
    for path in modules:
        source = read_source(path)
        if source:
            yield source


def docstring_documents(modules: list[Path]):
    """One document per module: the docstrings of the module, its classes and functions."""
    for path in modules:
        source = read_source(path)
        try:
            tree = ast.parse(source or "")
        except SyntaxError:
            continue
        docstrings = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring:
                    name = path.stem if isinstance(node, ast.Module) else f"{path.stem}.{node.name}"
                    docstrings.append(f"{name}\n\n{docstring}")
        if docstrings:
            yield "\n\n".join(docstrings)


def prose_documents():
    topics = pydoc_data.topics.topics
    for name in sorted(topics):
        yield topics[name]


def _is_licence(name: str) -> bool:
    return any(word in name.upper() for word in ("LICENSE", "LICENCE", "COPYING"))


# The licences come from these distributions only (torch is pinned by the Makefile), so that
# the corpus, and the demo's numbers, do not change when other packages are installed.
LICENSED_DISTRIBUTIONS = ("torch",)


def licence_documents():
    """Python's licence, then the licence files of LICENSED_DISTRIBUTIONS, each text once."""
    candidates = [Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"]
    for name in LICENSED_DISTRIBUTIONS:
        distribution = importlib.metadata.distribution(name)
        files = sorted(str(f) for f in distribution.files or () if _is_licence(Path(str(f)).name))
        candidates += [Path(distribution.locate_file(f)) for f in files]
    seen = set()
    for path in candidates:
        text = read_source(path)
        if text and text not in seen:
            seen.add(text)
            yield text


SITES = [
    "example-news.com",
    "dailyshopper.net",
    "techreviewhub.io",
    "recipes-for-all.org",
    "cityguide.info",
    "gadgetdeals.store",
    "travelnotes.blog",
    "healthtips.site",
]
COMPANIES = [
    "Example Media Group",
    "Shopper Holdings Ltd.",
    "Hub Digital Inc.",
    "Open Recipes Foundation",
    "City Guides LLC",
    "Deals & Co.",
]
TEMPLATES = [
    'We use cookies to improve your experience on {site}. By clicking "Accept all", you agree'
    " to the storing of cookies on your device to enhance site navigation, analyse site usage"
    " and assist in our marketing efforts. Manage preferences | Accept all | Reject all",
    "Copyright (c) {year} {company}. All rights reserved. Terms of Service | Privacy Policy |"
    " Cookie Policy | Contact us | Sitemap | Careers",
    "Click here to subscribe to our newsletter and get {percent}% off your first order! Enter"
    " your email address below. No spam, unsubscribe at any time. Subscribe",
    "Sign in to {site} to continue. Forgot your password? Create an account. Continue with email | Continue as guest",
    "Share this article: Facebook | Twitter | LinkedIn | Email | Print. Related posts: Top"
    " {count} tips you need to know in {year}. Read more >>",
    "Page {page} of {pages}. << Previous | 1 | 2 | 3 | ... | Next >>",
    "This website uses JavaScript. Please enable JavaScript in your browser settings and"
    " reload the page to continue to {site}.",
    "Loading... Please wait. If you are not redirected within {count} seconds, click here.",
    "Advertisement. Sponsored content from {company}. Limited offer: save {percent}% today"
    " only! Shop now. Free shipping on orders over ${count}.",
]


def boilerplate_documents(count: int = 4000):
    """Pages of web-crawl junk: a few templates with small random fills, in random order."""
    rng = random.Random(SEED)
    for _ in range(count):
        fill = {
            "site": rng.choice(SITES),
            "company": rng.choice(COMPANIES),
            "year": rng.randint(2012, 2024),
            "percent": rng.choice([5, 10, 15, 20, 25, 30, 50]),
            "count": rng.randint(3, 20),
            "page": rng.randint(1, 9),
            "pages": rng.randint(10, 40),
        }
        parts = rng.sample(TEMPLATES, k=rng.randint(2, 5))
        yield "\n\n".join(part.format(**fill) for part in parts)


def corpus_documents() -> dict[str, list[str]]:
    """Domain -> documents, deterministic for a given Python installation."""
    modules = stdlib_modules()
    sources = {
        "code": code_documents(modules[0::2]),  # code and docs read disjoint modules
        "docs": docstring_documents(modules[1::2]),
        "prose": prose_documents(),
        "licenses": licence_documents(),
        "boilerplate": boilerplate_documents(),
    }
    return {domain: take(documents, BUDGET_CHARS[domain]) for domain, documents in sources.items()}


WEB_PAGE_CHARS = 700
WEB_BUDGET_CHARS = 600_000  # per kind of page


def web_pages() -> dict[str, list[str]]:
    """Kind -> pages of the web variant's one domain: informative pages (reference-manual
    topics cut short, so that a training window holds several) and boilerplate pages."""
    return {
        "informative": take(prose_documents(), WEB_BUDGET_CHARS, WEB_PAGE_CHARS),
        "boilerplate": take(boilerplate_documents(), WEB_BUDGET_CHARS),
    }


VARIANTS = ("default", "web")


# --------------------------------------------------------------------------- files


def split_valid(documents: list[str], fraction: float = VALID_FRACTION) -> tuple[list[str], list[str]]:
    """(train, valid): the `fraction` of documents with the smallest hashes, at least one,
    is held out; equal texts hash alike, so none lands on both sides."""
    digests = {text: hashlib.sha256(text.encode()).hexdigest() for text in documents}
    ranked = sorted(set(documents), key=digests.__getitem__)
    held_out = set(ranked[: max(1, math.ceil(fraction * len(ranked)))])
    train = [text for text in documents if text not in held_out]
    valid = [text for text in documents if text in held_out]
    return train, valid


def write_jsonl(path: Path, documents: dict[str, list[str]]) -> None:
    """Written under a temporary name and renamed, so a file that exists is complete."""
    with replaced_atomically(path) as partial, partial.open("w", encoding="utf-8") as out:
        for domain, texts in documents.items():
            for text in texts:
                record = {"text": text, "meta": {"redpajama_set_name": domain}}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_corpus(out: Path, variant: str = "default") -> None:
    """train.jsonl and valid.jsonl under `out` (and train.kinds.json for the web variant)."""
    out.mkdir(parents=True, exist_ok=True)
    train, valid = {}, {}
    if variant == "web":
        kinds = {kind: split_valid(pages) for kind, pages in web_pages().items()}
        # One domain, its kinds one after the other: Megatron shuffles documents before packing.
        train["web"] = [page for pages, _ in kinds.values() for page in pages]
        valid["web"] = [page for _, pages in kinds.values() for page in pages]
        valid |= {f"web-{kind}": pages for kind, (_, pages) in kinds.items()}
        write_text_atomically(out / "train.kinds.json", json.dumps({"web": document_ranges(kinds)}, indent=2) + "\n")
    else:
        for domain, documents in corpus_documents().items():
            train[domain], valid[domain] = split_valid(documents)
    write_jsonl(out / "valid.jsonl", valid)
    write_jsonl(out / "train.jsonl", train)


def document_ranges(kinds: dict[str, tuple[list[str], list[str]]]) -> dict[str, list[int]]:
    """Kind -> [first, end) of its training documents' indices in the domain's dataset."""
    ranges, first = {}, 0
    for kind, (train, _) in kinds.items():
        ranges[kind] = [first, first + len(train)]
        first += len(train)
    return ranges


def build_tokenizer(out: Path) -> None:
    """tokenizer.model (written atomically, so one that exists is complete)."""
    train_tokenizer([str(out / "train.jsonl")], str(out / "tokenizer"), VOCAB_SIZE, seed=SEED)


def build_dataset(out: Path, split: str) -> None:
    job = TokenizeJob(
        inputs=[str(out / f"{split}.jsonl")],
        output_prefix=str(out / split),
        tokenizer_model=str(out / "tokenizer.model"),
        domain_key=DOMAIN_KEY,
    )
    tokenize(job)


def is_complete(out: Path, variant: str = "default") -> bool:
    """data_prep writes P.stats.json last, so its presence marks a finished dataset."""
    names = ["train.kinds.json"] if variant == "web" else []
    names += [
        "train.jsonl",
        "valid.jsonl",
        "tokenizer.model",
        "train.stats.json",
        "valid.stats.json",
        "train.blend.json",
        "valid.blend.json",
    ]
    return all((out / name).is_file() for name in names)


def build_demo_data(out: Path, variant: str = "default") -> None:
    """Every step whose output is missing; data_prep itself skips finished datasets."""
    if is_complete(out, variant):
        print(f"{out} is complete; nothing to do (delete it to rebuild)")
        return
    if not ((out / "train.jsonl").is_file() and (out / "valid.jsonl").is_file()):
        print(f"writing the {variant} corpus to {out}")
        write_corpus(out, variant)
    if not (out / "tokenizer.model").is_file():
        print(f"training a {VOCAB_SIZE}-token tokenizer")
        build_tokenizer(out)
    for split in ("train", "valid"):
        print(f"tokenizing the {split} split")
        build_dataset(out, split)


def summary(out: Path) -> str:
    lines = [f"{'split':<6} {'domain':<12} {'documents':>10} {'tokens':>10} {'weight':>7}"]
    for split in ("train", "valid"):
        for name, domain in read_blend_file(out / f"{split}.blend.json").domains.items():
            lines.append(f"{split:<6} {name:<12} {domain.documents:>10,} {domain.tokens:>10,} {domain.weight:>7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.demo",
        description=__doc__.split("\n\n")[0],
        epilog="examples: python -m data_prep.demo --out data/demo\n"
        "          python -m data_prep.demo --variant web --out data/demo-web",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="output directory")
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        default="default",
        help="default: five domains; web: one web-like domain of boilerplate and informative pages",
    )
    args = parser.parse_args(argv)
    build_demo_data(args.out, args.variant)
    print(summary(args.out))


if __name__ == "__main__":
    main()
