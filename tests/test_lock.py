"""Two runs on one output_dir, through the real `tune run`: the second is refused in one line and the first's
checkpoints stay as they were; once the first is killed (kill -9), the next run takes its lock over."""

import hashlib
import json
import signal
import subprocess
import sys

from conftest import REPO, TORCHAO_NOTICE, TUNE, offline_env, pointer, tune_run, wait_for

# No validation, no sample answers: only the steps and the checkpoints.
LIGHT = ["val_dataset=null", "run_val_every_n_steps=null", "sample_prompts=null", "sample_every_n_steps=null"]


def _hashes(out):
    """sha256 of every file in the complete checkpoint folders (not a folder being written)."""
    files = sorted(p for p in (out / "checkpoints").glob("step_*/**/*") if p.is_file())
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(TORCHAO_NOTICE)]


def _snapshot(out):
    return {str(p.relative_to(out)) for p in out.rglob("*")}


def test_a_second_run_on_the_same_output_dir_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path):
    out = tmp_path / "out"
    # Long enough to outlive the second run and the export (3000 steps); killed below.
    args = ["--config", "configs/tiny.yaml", f"output_dir={out}", *LIGHT, "epochs=5", "save_every_n_steps=5"]
    with open(tmp_path / "first.log", "w") as log:  # a file, not a pipe nobody reads while it runs
        cmd = [TUNE, "run", "lora_finetune_single_device.py", *args, "keep_last_n=null"]
        first = subprocess.Popen(cmd, cwd=REPO, env=offline_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: pointer(out) is not None, proc=first)
        held = json.loads((out / "run.lock").read_text())
        assert held["pid"] == first.pid
        before = _hashes(out)
        assert before and all(name.startswith("checkpoints/step_") for name in before)
        names_before = _snapshot(out)

        second = tune_run(out, *LIGHT, "max_steps_per_epoch=2", "metric_logger.filename=second.txt")
        lines = _lines(second.stderr_text)
        assert second.returncode == 2, second.stderr_text[-3000:]
        assert "Traceback" not in second.stdout_text + second.stderr_text
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert f"PID {first.pid}" in lines[0] and held["started"] in lines[0] and "output_dir=" in lines[0]

        # Export reads the checkpoints the live run is writing: refused too.
        cmd = [sys.executable, "-m", "lora_tools.export", "--config", "configs/tiny.yaml", f"output_dir={out}"]
        export = subprocess.run(cmd, cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300)
        lines = _lines(export.stderr)
        assert export.returncode == 2 and len(lines) == 1 and f"PID {first.pid}" in lines[0], export.stderr[-3000:]

        assert first.poll() is None  # the first run was running all along
        assert json.loads((out / "run.lock").read_text()) == held
        assert {name: digest for name, digest in _hashes(out).items() if name in before} == before
        written = _snapshot(out) - names_before  # only the first run's own new checkpoints
        assert [n for n in written if not n.startswith("checkpoints/")] == []
        assert not (out / "logs" / "second.txt").exists() and not list(out.glob("checkpoints-before-*"))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert (out / "run.lock").exists()  # left behind by the killed run

    third = tune_run(out, *LIGHT, "max_steps_per_epoch=2", "save_every_n_steps=null")
    assert third.returncode == 0, third.stderr_text[-3000:]
    warnings = [ln for ln in _lines(third.stderr_text) if ln.startswith("warning: ")]
    assert len(warnings) == 1 and "took over the lock left by" in warnings[0], third.stderr_text[-3000:]
    assert f"PID {first.pid}" in warnings[0] and held["started"] in warnings[0]
    assert pointer(out) == "step_0000002"
    assert not (out / "run.lock").exists()
