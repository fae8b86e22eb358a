"""BENCHMARKS.md's tables are what bench/report.py generates from the committed result files in bench/results/."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
LABEL = "transcribed from the original run's log (raw output not kept); re-run"


def test_benchmarks_md_matches_the_committed_result_files():
    run = subprocess.run(
        [sys.executable, "-m", "bench.report", "--check"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_a_number_edited_by_hand_fails_the_check_and_a_rewrite_restores_it(tmp_path, capsys):
    original = (REPO / "BENCHMARKS.md").read_text()
    copy = tmp_path / "BENCHMARKS.md"
    # run 1's tokens/s for `ours` default, a figure inside a generated table
    assert original.count("| 31,206 (again: 31,120) |") == 1
    copy.write_text(original.replace("| 31,206 (again: 31,120) |", "| 32,206 (again: 31,120) |"))
    assert report.main(["--check", "--file", str(copy)]) == 1
    assert "-| 5cc5c00 | ours | on | off | off | 32,206" in capsys.readouterr().out  # the diff names the line
    assert report.main(["--file", str(copy)]) == 0
    assert copy.read_text() == original


def test_every_result_file_says_where_it_comes_from():
    files = sorted(RESULTS.glob("*.json"))
    assert files
    text = (REPO / "BENCHMARKS.md").read_text()
    for path in files:
        data = json.loads(path.read_text())
        for key in ("command", "commit", "date", "machine", "versions", "table", "settings", "rows"):
            assert data.get(key), (path.name, key)
        assert f"<!-- table: {data['table']} -->" in text, path.name
        assert f"`{path.name}`: `{data['command']}`" in text, path.name
        if data.get("transcribed"):
            assert "e78cfa5" in data["source"] and "not kept" in data["source"], path.name
            assert data["regenerate"], path.name


def test_transcribed_rows_are_labelled_in_the_tables():
    text = (REPO / "BENCHMARKS.md").read_text()
    transcribed = [json.loads(p.read_text()) for p in RESULTS.glob("*.json")]
    transcribed = [d for d in transcribed if d.get("transcribed")]
    assert {d["commit"] for d in transcribed} >= {"5cc5c00", "f046142"}  # the H200 runs
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and " | 5cc5c00 | " in f" {line}"]
    assert table_rows and all(line.endswith(" transcribed |") for line in table_rows)
    for data in transcribed:
        assert f"{LABEL[0].upper()}{LABEL[1:]} {data['regenerate']} to regenerate.**" in text


def test_a_result_file_for_a_table_without_markers_is_refused(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(RESULTS / "20261128-05-transcribed-gpu-5cc5c00-run1.json", results / "a.json")
    data = json.loads((results / "a.json").read_text())
    (results / "b.json").write_text(json.dumps({**data, "table": "gpu-small-train-on-input-true"}))
    copy = tmp_path / "BENCHMARKS.md"
    shutil.copy(REPO / "BENCHMARKS.md", copy)
    with pytest.raises(SystemExit, match="no place in BENCHMARKS.md for table.*gpu-small-train-on-input-true"):
        report.main(["--check", "--results", str(results), "--file", str(copy)])
