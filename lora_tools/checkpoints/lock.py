"""One run at a time per output_dir: ``<output_dir>/run.lock`` names the run that holds it (PID, host, start).

A second run on the same output_dir is refused in one line while the first is alive. A lock left by a run that
died without releasing it (kill -9, a crash of the machine) is taken over with a warning when it names a process
of this host that is gone; a lock from another host is refused, as this host cannot tell. Export and evaluation
refuse while a live run holds the lock: its checkpoints may be half written or rotated away.
"""

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_tools.errors import UserError

LOCK = "run.lock"


def is_main_process() -> bool:
    """Under torchrun only the first process (RANK 0) takes the lock; a plain run has no RANK."""
    return all(os.environ.get(key, "0") == "0" for key in ("RANK", "LOCAL_RANK"))


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) from /proc, or None where there is no /proc entry."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]


def _record() -> dict:
    stat = _proc_stat(os.getpid())
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "proc_start": stat[1] if stat else None,  # tells a reused PID (after a reboot) from the run itself
    }


def _alive(held: dict) -> bool:
    """Whether the process the lock names (on this host) still runs: os.kill(pid, 0), a zombie counted as gone."""
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    stat = _proc_stat(held["pid"])
    if stat is None:
        return True
    return stat[0] != "Z" and held.get("proc_start") in (None, stat[1])


def _read(path: Path) -> tuple[dict, int] | None:
    """The lock's record and inode, or None when there is no lock."""
    try:
        with open(path) as f:
            text, inode = f.read(), os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return None
    try:
        held = json.loads(text)
        held["pid"], held["host"], held["started"] = int(held["pid"]), str(held["host"]), str(held["started"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} was not written by this project; delete it if no run is using {path.parent}")
    return held, inode


def _describe(held: dict) -> str:
    return f"PID {held['pid']} on {held['host']}, started {held['started']}"


def _refuse_if_held(path: Path, held: dict, fix: str) -> None:
    """Refuse when the lock's run is alive, or on another host (where this host cannot tell)."""
    if held["host"] != socket.gethostname():
        raise UserError(
            f"{path.parent} is locked by a run on another host ({_describe(held)}) that this host cannot check; "
            f"{fix}, or delete {path} if that run is gone"
        )
    if _alive(held):
        raise UserError(f"{path.parent} is in use by another run ({_describe(held)}); {fix}")


def _create(path: Path, source: Path) -> bool:
    """Make ``path`` a copy of ``source`` unless it exists: a hard link (all at once), or an exclusive create
    where the file system has no hard links. False when ``path`` exists."""
    try:
        os.link(source, path)
    except FileExistsError:
        return False
    except OSError:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(source.read_text())
    return True


def _take_over(path: Path, held: dict, inode: int) -> None:
    """Remove the lock of a run that is gone. It is renamed to a name of this process first: if another run
    replaced it in the meantime (another inode), its lock is put back and the next attempt refuses."""
    aside = path.with_name(f".{LOCK}.stale.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if os.stat(aside).st_ino != inode:
        _create(path, aside)
    else:
        message = f"warning: {path.parent}: took over the lock left by {_describe(held)} (no longer running)"
        print(message, file=sys.stderr, flush=True)
    aside.unlink()


def _acquire(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{LOCK}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    try:
        for _ in range(5):
            if _create(path, tmp):
                return
            found = _read(path)
            if found is not None:
                _refuse_if_held(path, found[0], "wait for it to finish, or choose another output_dir=...")
                _take_over(path, *found)
        raise UserError(f"{path} keeps changing: other runs are starting on {path.parent}; choose another output_dir")
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def hold(output_dir: str | os.PathLike) -> Iterator[Path | None]:
    """Hold ``<output_dir>/run.lock`` for the duration of a run (main process only); released on any exit. The
    folders made to hold it are removed again if nothing else was written there."""
    if not is_main_process():
        yield None
        return
    out = Path(output_dir)
    made = [p for p in [out, *out.parents] if not p.exists()]  # deepest first
    out.mkdir(parents=True, exist_ok=True)
    path, record = out / LOCK, _record()
    try:
        _acquire(path, record)
        yield path
    finally:
        found = _read_quietly(path)
        if found is not None and found[0] == record:
            path.unlink(missing_ok=True)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote there
                break


def _read_quietly(path: Path) -> tuple[dict, int] | None:
    try:
        return _read(path)
    except UserError:
        return None


def check_not_running(output_dir: str | os.PathLike, checkpoint: Path | None = None) -> None:
    """For commands that read checkpoints: refuse while a live run writes into ``output_dir`` (with
    ``checkpoint``, a ``<dir>/checkpoints/step_N`` folder: into ``<dir>``). A lock left by a run that is gone is
    ignored (the next run takes it over)."""
    path = (Path(checkpoint).absolute().parent.parent if checkpoint else Path(output_dir)) / LOCK
    found = _read(path)
    if found is not None and (found[0]["pid"], found[0]["host"]) != (os.getpid(), socket.gethostname()):
        _refuse_if_held(path, found[0], "its checkpoints may still be written or rotated; wait for it to finish")
