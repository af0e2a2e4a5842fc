"""A 2-process run with a weights log, and the report that reads it."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from helpers import REPO
from helpers.e2e import ENV, pretrain

from launch.sources import read_blend


def test_a_run_logs_its_weights_and_the_report_shows_them(tmp_path, demo_dir):
    run_dir = tmp_path / "run"
    pretrain(run_dir, demo_dir, "logging.weights_every=4")
    domains = read_blend(str(demo_dir / "train.blend.json")).domains
    logged = sorted(path.name for path in (run_dir / "weights").glob("*.jsonl"))
    assert logged == ["step_00000004.jsonl", "step_00000008.jsonl"]
    for name in logged:
        rows = [json.loads(line) for line in (run_dir / "weights" / name).read_text().splitlines()]
        assert len(rows) == 2 * 2  # DP x micro_batch_size
        assert math.isclose(sum(r["weight"] for r in rows), 1.0, rel_tol=1e-6)
        assert all(r["domain"] in domains and r["documents"] for r in rows)

    kinds = tmp_path / "kinds.json"  # every domain's documents as two kinds: all of them, then none
    kinds.write_text(json.dumps({d: {"early": [0, 10**9], "late": [10**9, 2 * 10**9]} for d in domains}))
    command = [sys.executable, "-m", "launch.tools.report", "--weights", str(run_dir), "--kinds", str(kinds)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr
    for domain in {r["domain"] for name in logged for r in map(json.loads, (run_dir / "weights" / name).open())}:
        assert f"{domain}: most weighted" in result.stdout and f"{domain}: least weighted" in result.stdout
    assert "(steps 4-8, after a warm-up of 2)" in result.stdout
    assert f"{rows[0]['domain']}: early 100.0% / 100.0%" in result.stdout
    assert (run_dir / "weights" / "weights.png").stat().st_size > 0
