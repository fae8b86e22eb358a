"""Smoke test of the benchmark command (benchmarks themselves are not tests): 2 steps per stack, the result file
it writes, and the BENCHMARKS.md table bench/report.py makes of it."""

import json
import subprocess
import sys

from conftest import REPO, offline_env

from bench import report


def test_bench_runs_two_steps_per_stack_and_writes_a_result_file(tmp_path):
    results = tmp_path / "results"
    result_file = results / "bench.json"
    args = ["--steps", "2", "--stacks", "ours,torchtune,trl", "--memory-budget", "20", "--recompiles"]
    args += ["--json", str(result_file)]
    run = subprocess.run(
        [sys.executable, "-m", "bench.run", *args],
        cwd=REPO,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    data = json.loads(result_file.read_text())
    rows = {r["stack"]: r for r in data["rows"]}
    assert sorted(rows) == ["ours", "torchtune", "trl"]
    for stack, row in rows.items():
        assert "error" not in row, (stack, row)
        assert row["steps"] == 2 and row["tokens_per_second"] > 0 and row["peak_rss_gib"] > 0
        assert row["time_to_first_step_s"] is not None
    # --memory-budget: our recipe planned its memory and printed the choice (ours only; the others have no plan).
    assert rows["ours"]["predicted_peak_gib"] > 0 and "batch_size=2" in rows["ours"]["plan_overrides"]
    assert "predicted_peak_gib" not in rows["torchtune"] and rows["ours"]["recompiles"] == 0  # compile is off
    table = run.stdout[run.stdout.index("| stack |") :]
    assert all(f"| {stack} | default |" in table for stack in rows)

    # Where the figures come from: command, commit, date, machine, versions (TRL's from .venv-hf), settings.
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert data["command"] == "python -m bench.run " + " ".join(args)
    assert data["commit"] == (git.stdout.strip() if git.returncode == 0 else "unknown")
    assert data["date"] and data["machine"]["device"] and data["complete"] is True
    assert {"python", "torch", "torchtune", "torchao", "transformers", "peft", "trl"} <= set(data["versions"])
    assert data["table"] == "cpu-trl" and data["settings"]["steps"] == 2 and data["settings"]["device"] == "cpu"

    # bench/report.py renders it into the table its "table" field names.
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# B\n\n<!-- table: cpu-trl -->\n<!-- end table -->\n")
    assert report.main(["--results", str(results), "--file", str(md)]) == 0
    text = md.read_text()
    for stack in rows:
        assert f"| 1 x 2 | {stack} | {rows[stack]['tokens_per_second']:,.0f} |" in text
    assert f"1. `bench.json`: `{data['command']}`" in text and "transcribed" not in text
    assert report.main(["--check", "--results", str(results), "--file", str(md)]) == 0
    # The GPU plan table's renderer on the same file: the plan's choice and predicted peak of the ours row.
    plan_table = report.plan_check(report.Context([{**data, "file": "bench.json"}]))
    assert f"`{rows['ours']['plan_overrides']}`" in plan_table and "| 20 GiB |" in plan_table
