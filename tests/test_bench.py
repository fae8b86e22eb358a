"""Smoke test of the benchmark command (benchmarks themselves are not tests): 2 steps per stack."""

import json
import subprocess
import sys

from conftest import REPO, offline_env


def test_bench_runs_two_steps_per_stack(tmp_path):
    results = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "bench.run", "--steps", "2", "--stacks", "ours,torchtune,trl", "--json", str(results)]
    run = subprocess.run(cmd, cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = {r["stack"]: r for r in json.loads(results.read_text())["rows"]}
    assert sorted(rows) == ["ours", "torchtune", "trl"]
    for stack, row in rows.items():
        assert "error" not in row, (stack, row)
        assert row["steps"] == 2 and row["tokens_per_second"] > 0 and row["peak_rss_gib"] > 0
        assert row["time_to_first_step_s"] is not None
    table = run.stdout[run.stdout.index("| stack |") :]
    assert all(f"| {stack} | default |" in table for stack in rows)
