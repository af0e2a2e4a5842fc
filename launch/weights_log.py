"""Which data the reweighting favours and skips: `logging.weights_every` writes, every N
steps, the domain, documents, loss and weight of each weighting unit (a sample, or with
`reweight.unit: document` a document segment of one) of the step's first global
micro-batch to RUN/weights/step_XXXXXXXX.jsonl; `python -m launch.tools.report --weights`
reads them.  A row's `document_tokens` are how many of its input tokens each of its
`documents` holds, so a weight can be spread over the documents it covers.

A sample's documents come from Megatron's own indices (the blend's `dataset_index` /
`dataset_sample_index`, then the domain dataset's `shuffle_index`, `sample_index` and
`document_index`), not from its tokens.  The loss report's gathered losses and weights are
the same on every rank and in data-parallel rank order, so the one reporting rank writes the
whole global micro-batch without another collective.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron.core.datasets.blended_dataset import BlendedDataset

from data_prep.files import write_text_atomically
from launch.mixing import MixedDataset

WEIGHTS_DIR = "weights"


def sample_documents(dataset, index: int) -> tuple[int, int, list[int], list[int]]:
    """(domain id, sample index in the domain's dataset, the documents the sample spans in
    order (indices into the domain's IndexedDataset), and how many of the sample's input
    tokens each holds) of `dataset[index]`.  A sample reads its sequence length plus one
    token, the last a label only, so the last document may hold no input token."""
    domain, sample = 0, index
    if isinstance(dataset, BlendedDataset):
        domain, sample = int(dataset.dataset_index[index]), int(dataset.dataset_sample_index[index])
        dataset = dataset.datasets[domain]
    elif isinstance(dataset, MixedDataset):  # data.mixing=odm: the step being read
        domain, sample = dataset.locate(index)
        dataset = dataset.datasets[domain]
    row = dataset.shuffle_index[sample]
    (first, start), (last, end) = dataset.sample_index[row], dataset.sample_index[row + 1]
    documents = [int(d) for d in dataset.document_index[first : last + 1]]
    tokens = [int(n) for n in dataset.dataset.sequence_lengths[documents]]
    tokens[-1] = int(end)  # read up to its offset, plus the label-only token
    tokens[0] -= int(start)
    return domain, sample, documents, tokens


def weight_rows(
    dataset, first_index: int, step: int, domains: list[str], report: dict, units_per_row: int = 1
) -> list[dict]:
    """The rows of the global micro-batch at dataset indices first_index, … (the gathered
    `weights`, `sample_losses` and `token_counts` of its loss report, `units_per_row` per
    sample): one per sample, or one per document segment (`segment` j holds the sample's
    j-th document with input tokens, the last slot the rest); slots with no loss token are left out."""
    weights, losses, counts = (
        report[key].reshape(-1, units_per_row).tolist() for key in ("weights", "sample_losses", "token_counts")
    )
    rows = []
    for offset in range(len(weights)):
        domain, sample, documents, tokens = sample_documents(dataset, (first_index + offset) % len(dataset))
        row = {"step": step, "domain": domains[domain], "dataset_sample": sample}
        if units_per_row == 1:
            rows.append(
                row
                | {
                    "documents": documents,
                    "document_tokens": tokens,
                    "loss": losses[offset][0],
                    "weight": weights[offset][0],
                }
            )
            continue
        segments = [(d, n) for d, n in zip(documents, tokens) if n > 0]
        for slot in range(units_per_row):
            if counts[offset][slot] == 0:
                continue
            held = segments[slot:] if slot == units_per_row - 1 else segments[slot : slot + 1]
            rows.append(
                row
                | {
                    "segment": slot,
                    "documents": [d for d, _ in held],
                    "document_tokens": [n for _, n in held],
                    "loss": losses[offset][slot],
                    "weight": weights[offset][slot],
                }
            )
    return rows


def write_weights(run_dir: Path, step: int, rows: list[dict]) -> Path:
    path = Path(run_dir) / WEIGHTS_DIR / f"step_{step:08d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_weights(run_dir: Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted((Path(run_dir) / WEIGHTS_DIR).glob("step_*.jsonl"))
        for line in path.read_text().splitlines()
    ]
