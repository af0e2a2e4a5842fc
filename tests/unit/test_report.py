"""`python -m launch.tools.report`: runs with other domains, runs of the same name, bad paths,
torn and broken metrics lines."""

from __future__ import annotations

import json

from launch.tools import report


def fake_run(run_dir, losses: dict[str, float], step: int = 8):
    """A run directory with one train row and one held-out evaluation."""
    run_dir.mkdir(parents=True)
    train = {
        "kind": "train", "step": step, "loss": 4.0, "weighted_loss": 4.0, "weight_ess": 1.0, "weight_entropy": 1.0,
        "domain_weight_share": {d: 1 / len(losses) for d in losses},
        "domain_sample_share": {d: 1 / len(losses) for d in losses},
    }  # fmt: skip
    valid = {
        "kind": "valid",
        "step": step,
        "valid_loss": sum(losses.values()) / len(losses),
        "valid_loss_per_domain": losses,
    }
    (run_dir / "metrics.jsonl").write_text(json.dumps(train) + "\n" + json.dumps(valid) + "\n")
    return run_dir


def table_rows(text: str) -> dict[str, str]:
    return {line.split()[0]: line for line in text.splitlines()[3:]}


def test_runs_with_different_domains_show_the_union_with_blank_cells(tmp_path, capsys):
    a = fake_run(tmp_path / "a", {"code": 1.0, "prose": 2.0})
    b = fake_run(tmp_path / "b", {"code": 3.0, "web": 4.0})
    assert report.main([str(a), str(b), "--out", str(tmp_path / "fig.png")]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows["code"].split() == ["code", "1.0000", "3.0000"]
    assert rows["prose"].split() == ["prose", "2.0000"] and rows["web"].split() == ["web", "4.0000"]
    # each value stands in its run's column: prose under a, web under b
    assert rows["prose"].index("2.0000") == rows["code"].index("1.0000")
    assert rows["web"].index("4.0000") == rows["code"].index("3.0000")
    assert (tmp_path / "fig.png").stat().st_size > 0


def test_runs_of_the_same_name_get_the_shortest_distinct_labels(tmp_path, capsys):
    runs = [
        fake_run(tmp_path / "a" / "linupper", {"code": 1.0}),
        fake_run(tmp_path / "b" / "linupper", {"code": 2.0}),
        fake_run(tmp_path / "b" / "uniform", {"code": 3.0}),
    ]
    assert report.labels(runs) == ["a/linupper", "b/linupper", "uniform"]
    assert report.main([str(r) for r in runs]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["domain", "a/linupper", "b/linupper", "uniform"]


def test_a_run_without_held_out_loss_gets_a_blank_column(tmp_path, capsys):
    a = fake_run(tmp_path / "a", {"code": 1.0})
    b = tmp_path / "b"
    b.mkdir()
    (b / "metrics.jsonl").write_text("")
    assert report.main([str(a), str(b), "--out", str(tmp_path / "fig.png")]) == 0
    assert table_rows(capsys.readouterr().out)["code"].split() == ["code", "1.0000"]


def test_missing_or_non_run_directories_are_one_line_errors(tmp_path, capsys):
    run = fake_run(tmp_path / "run", {"code": 1.0})
    (tmp_path / "empty").mkdir()
    for bad, message in [
        (tmp_path / "missing", "no such directory"),
        (tmp_path / "empty", "not a run directory (no metrics.jsonl): give the --run-dir of a launch.pretrain run"),
    ]:
        assert report.main([str(run), str(bad)]) == 2
        captured = capsys.readouterr()
        assert captured.err == f"python -m launch.tools.report: error: {bad}: {message}\n" and captured.out == ""
    assert report.main([str(run), str(run)]) == 2
    assert "given twice" in capsys.readouterr().err


def test_a_torn_last_line_is_left_out_and_a_broken_earlier_one_is_a_one_line_error(tmp_path, capsys):
    run = fake_run(tmp_path / "run", {"code": 1.0})
    metrics = run / "metrics.jsonl"
    with metrics.open("a") as stream:
        stream.write('{"kind": "tra')  # a write cut short by a kill
    assert report.main([str(run), "--out", str(tmp_path / "fig.png")]) == 0
    assert table_rows(capsys.readouterr().out)["code"].split() == ["code", "1.0000"]
    train, valid = metrics.read_text().splitlines()[:2]
    metrics.write_text(train[:10] + "\n" + valid + "\n")
    assert report.main([str(run)]) == 2
    captured = capsys.readouterr()
    assert (
        captured.err
        == f"python -m launch.tools.report: error: {metrics}:1 is not a JSON row; repair or remove that line\n"
    )
    assert captured.out == ""
