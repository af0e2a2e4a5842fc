"""Evaluate an exported model with lm-evaluation-harness (`lm_eval.simple_evaluate`, HF backend, CPU).

python -m launch.tools.evaluate --model exports/gpt2 --tasks hellaswag,arc_easy --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launch import quiet

quiet.install()  # the same filter as every entry point, before lm-eval and transformers load

from data_prep.files import write_text_atomically  # noqa: E402

EXAMPLES = """\
examples:
  python -m launch.tools.evaluate --model exports/gpt2 --tasks hellaswag,arc_easy --limit 200 --out results.json
  # a local task (YAML + data file), no network: the test suite's tiny one, from the repository root
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m launch.tools.evaluate --model exports/demo \\
      --tasks tiny_python --include-path tests/lm_eval_tasks --out results.json

Task names are lm-eval's (`lm-eval ls tasks`) or those of YAML files under --include-path.
Built-in tasks download their data sets from the Hugging Face hub unless they are cached.
"""


def evaluate(
    model_dir: Path, tasks: list[str], limit: int | None = None, include_path: str | None = None, batch_size: int = 8
) -> dict:
    """lm-eval's results for `tasks` on the model directory (as written by launch.tools.export)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(
            f"{model_dir} is not a model directory (no config.json): export one with python -m launch.tools.export"
        )
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f" or in {include_path}" if include_path else "; pass --include-path for local task YAMLs"
        raise ValueError(f"unknown task(s) {', '.join(unknown)}: not among lm-eval's tasks{where}")
    return lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": "float32"},
        tasks=tasks,
        limit=limit,
        batch_size=batch_size,
        device="cpu",
        task_manager=manager,
        log_samples=False,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.tools.evaluate",
        description="Run lm-evaluation-harness tasks on a model exported by launch.tools.export (CPU).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, type=Path, help="exported model directory")
    parser.add_argument("--tasks", required=True, help="comma-separated task names, e.g. hellaswag,arc_easy")
    parser.add_argument("--limit", type=int, help="at most this many examples per task (quick checks)")
    parser.add_argument("--include-path", help="folder of extra task YAMLs")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="examples per forward pass: more is faster, needs more memory (default: %(default)s)",
    )
    parser.add_argument("--out", required=True, type=Path, help="results JSON to write")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        results = evaluate(args.model, tasks, args.limit, args.include_path, args.batch_size)
    except ValueError as error:
        print(f"evaluate error: {error}", file=sys.stderr)
        return 2
    from lm_eval.utils import handle_non_serializable, make_table

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.out, json.dumps(results, indent=2, default=handle_non_serializable))
    print(make_table(results))
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
