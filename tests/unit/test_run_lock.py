"""Unit tier: the output_dir lock (lora_tools.checkpoints.lock) in this process, with real files and PIDs."""

import json
import os
import socket
import subprocess

import pytest

from lora_tools.checkpoints import lock
from lora_tools.errors import UserError


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _write_lock(out, pid, host=None, started="2025-01-02 03:04:05 +0000"):
    out.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), "started": started}
    (out / lock.LOCK).write_text(json.dumps(record))
    return out / lock.LOCK


def test_acquire_writes_pid_host_and_start_then_releases(tmp_path):
    out = tmp_path / "out"
    with lock.hold(out) as path:
        assert path == out / "run.lock"
        held = json.loads(path.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["started"]
        assert [p.name for p in out.iterdir()] == ["run.lock"]  # no temporary file left
    assert not (out / "run.lock").exists()


def test_a_folder_made_for_the_lock_is_removed_again_when_nothing_was_written(tmp_path):
    with lock.hold(tmp_path / "a" / "out"):
        pass
    assert list(tmp_path.iterdir()) == []
    with lock.hold(tmp_path / "b" / "out") as path:
        (path.parent / "log.txt").write_text("written")
    assert [p.name for p in (tmp_path / "b" / "out").iterdir()] == ["log.txt"]


def test_released_when_the_run_raises(tmp_path):
    with pytest.raises(UserError, match="bad input"), lock.hold(tmp_path) as path:
        raise UserError("bad input")
    assert not path.exists()


def test_a_live_run_is_refused_naming_its_pid_host_and_start(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        path = _write_lock(tmp_path, sleeper.pid)
        before = path.read_text()
        with pytest.raises(UserError) as refused, lock.hold(tmp_path):
            pytest.fail("the lock was taken")
        message = str(refused.value)
        assert "\n" not in message
        for words in (f"PID {sleeper.pid}", socket.gethostname(), "2025-01-02 03:04:05", "output_dir="):
            assert words in message, message
        assert path.read_text() == before  # the first run's lock is left alone
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]
        with pytest.raises(UserError, match=f"PID {sleeper.pid}"):
            lock.check_not_running(tmp_path)
        with pytest.raises(UserError, match=f"PID {sleeper.pid}"):
            lock.check_not_running("elsewhere", checkpoint=tmp_path / "checkpoints" / "step_0000005")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, capsys):
    dead = _dead_pid()
    path = _write_lock(tmp_path, dead)
    lock.check_not_running(tmp_path)  # export and evaluate read on
    with lock.hold(tmp_path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "took over the lock left by" in err[0]
    assert f"PID {dead}" in err[0] and "2025-01-02 03:04:05" in err[0]
    assert not path.exists()


def test_a_reused_pid_does_not_hold_the_lock(tmp_path, capsys):
    """After a reboot the PID may belong to another process: the recorded process start time tells them apart."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        path = _write_lock(tmp_path, sleeper.pid)
        held = json.loads(path.read_text())
        path.write_text(json.dumps({**held, "proc_start": "1"}))  # a process started one tick after boot
        with lock.hold(tmp_path):
            pass
        assert "took over the lock left by" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lock_from_another_host_is_refused(tmp_path):
    path = _write_lock(tmp_path, _dead_pid(), host="other-node-7")
    with pytest.raises(UserError) as refused, lock.hold(tmp_path):
        pytest.fail("the lock was taken")
    message = str(refused.value)
    assert "other-node-7" in message and "PID" in message and f"delete {path}" in message
    assert path.exists()
    with pytest.raises(UserError, match="other-node-7"):
        lock.check_not_running(tmp_path)


def test_an_unreadable_lock_is_refused_in_one_line(tmp_path):
    (tmp_path / "run.lock").write_text("not json")
    with pytest.raises(UserError, match="delete it if no run is using"), lock.hold(tmp_path):
        pytest.fail("the lock was taken")


def test_only_the_first_process_under_torchrun_takes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with lock.hold(tmp_path) as path:
        assert path is None and not (tmp_path / "run.lock").exists()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with lock.hold(tmp_path) as path:
        assert path.exists()
