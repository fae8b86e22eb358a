"""Secrets and settings from ``.env``: values already in the process environment win over the file."""

import io
import os
from pathlib import Path

from dotenv import dotenv_values, load_dotenv
from dotenv.parser import parse_stream

from lora_tools.errors import UserError

WANDB_AUTHORIZE_URL = "https://wandb.ai/authorize"


def load_env(path: str | os.PathLike | None = None) -> Path | None:
    """Load ``.env`` from ``path``, or the current folder. Returns the file read, or None when there is none.

    A malformed line is a UserError: python-dotenv would only warn and leave that line's variable unset,
    which then shows up much later as a missing token.
    """
    env_file = Path(path) if path is not None else Path.cwd() / ".env"
    if not env_file.is_file():
        return None
    check_env_file(env_file, shown=str(path) if path is not None else ".env")
    load_dotenv(env_file, override=False)
    return env_file


def check_env_file(env_file: Path, shown: str = ".env") -> None:
    """Raise UserError for the first line that is not KEY=value. Never prints a line's content: it may be a secret."""
    try:
        text = env_file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{shown} is not UTF-8 text (byte {e.start}); save it as UTF-8")
    except OSError as e:
        raise UserError(f"{shown} cannot be read ({e.strerror}); fix its permissions or remove it")
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            original = binding.original.string
            # The parser's line is where it started reading, blank lines before the bad one included.
            skipped = original[: len(original) - len(original.lstrip())].count("\n")
            line = binding.original.line + skipped
            raise UserError(f"{shown} line {line} is not KEY=value ({_why(original)}); fix or remove that line")


def _why(original: str) -> str:
    """What is wrong with a line python-dotenv cannot parse, in words that do not repeat its content."""
    text = original.strip()
    if "=" not in text:
        return "no '=' between the name and the value"
    name, _, value = text.partition("=")
    name = name.strip().removeprefix("export ").strip()
    if not name:
        return "no name before '='"
    if any(c.isspace() or c in "#\"'" for c in name):
        return "a space or quote in the name"
    if value.count('"') % 2 or value.count("'") % 2:
        return "a quote that is not closed"
    return "text after the closing quote"


def value_source(name: str) -> str:
    """Where a variable's value came from, for messages: 'in .env' or 'in the environment'."""
    env_file = Path.cwd() / ".env"
    if env_file.is_file() and dotenv_values(env_file).get(name) == os.environ.get(name):
        return "in .env"
    return "in the environment"


def wandb_key_problem(key: str) -> str | None:
    """wandb's own shape check of an API key: a sentence that names only the problem (never the key), or None."""
    from wandb.sdk.lib.wbauth.validation import check_api_key

    return check_api_key(key)


def wandb_key_shape_error(key: str) -> UserError | None:
    problem = wandb_key_problem(key)
    if problem is None:
        return None
    return UserError(
        f"WANDB_API_KEY {value_source('WANDB_API_KEY')} has the wrong shape ({problem}); "
        f"copy it again from {WANDB_AUTHORIZE_URL}"
    )
