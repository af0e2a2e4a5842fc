"""Which data the reweighting favours and skips: `logging.weights_every` writes, every N
steps, the domain, documents, loss and weight of each sample of the step's first global
micro-batch to RUN/weights/step_XXXXXXXX.jsonl; `python -m launch.tools.report --weights`
reads them.

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


def sample_documents(dataset, index: int) -> tuple[int, int, list[int]]:
    """(domain id, sample index in the domain's dataset, the documents the sample spans
    in order, each an index into the domain's IndexedDataset) of `dataset[index]`."""
    domain, sample = 0, index
    if isinstance(dataset, BlendedDataset):
        domain, sample = int(dataset.dataset_index[index]), int(dataset.dataset_sample_index[index])
        dataset = dataset.datasets[domain]
    elif isinstance(dataset, MixedDataset):  # data.mixing=odm: the step being read
        domain, sample = dataset.locate(index)
        dataset = dataset.datasets[domain]
    row = dataset.shuffle_index[sample]
    first, last = dataset.sample_index[row][0], dataset.sample_index[row + 1][0]
    return domain, sample, [int(d) for d in dataset.document_index[first : last + 1]]


def weight_rows(dataset, first_index: int, step: int, domains: list[str], report: dict) -> list[dict]:
    """One row per sample of the global micro-batch at dataset indices first_index, … (the
    gathered `weights` and `sample_losses` of its loss report, one per sample)."""
    rows = []
    for offset, (loss, weight) in enumerate(zip(report["sample_losses"].tolist(), report["weights"].tolist())):
        domain, sample, documents = sample_documents(dataset, (first_index + offset) % len(dataset))
        rows.append(
            {
                "step": step,
                "domain": domains[domain],
                "dataset_sample": sample,
                "documents": documents,
                "loss": loss,
                "weight": weight,
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
