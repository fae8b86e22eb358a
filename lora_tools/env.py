"""Secrets and settings from ``.env``: values already in the process environment win over the file."""

import os
from pathlib import Path

from dotenv import load_dotenv


def load_env(path: str | os.PathLike | None = None) -> Path | None:
    """Load ``.env`` from ``path``, or the current folder. Returns the file read, or None when there is none."""
    env_file = Path(path) if path is not None else Path.cwd() / ".env"
    if not env_file.is_file():
        return None
    load_dotenv(env_file, override=False)
    return env_file
