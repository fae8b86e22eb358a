"""Rows of a user's data file (or Hub dataset) turned into conversations, each problem one line with its row.

Formats read: JSON (an array of rows), JSON Lines, CSV (a conversation column holds JSON text), parquet, and
whatever ``datasets.load_dataset`` reads by name (the Hugging Face Hub) or folder. Conversations come as
OpenAI-style messages (``role``/``content``) or ShareGPT (``from``/``value``, roles human/gpt/system);
instructions as columns mapped in the config.
"""

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

from lora_tools.errors import UserError

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
# ShareGPT exports also use these for the two speakers
ROLES.update({"bot": "assistant", "model": "assistant", "chatgpt": "assistant"})


def is_local(source: str) -> bool:
    """A path to a local file (by suffix or because it is one). Anything else goes to ``datasets.load_dataset``:
    a Hub dataset name, or a local folder of data files."""
    return source.lower().endswith(LOCAL_SUFFIXES) or Path(source).is_file()


def read_rows(source: str, split: str = "train", section: str = "dataset") -> Iterator[tuple[str, dict]]:
    """(where, row) for every row: ``where`` names the file and row number for error messages."""
    if not is_local(source):
        yield from _hub_rows(source, split, section)
        return
    if split != "train":  # a slice such as train[:98%] would otherwise be ignored, and train on the val rows
        raise UserError(
            f"{section}.split is {split!r}, but split only applies to Hub datasets; put {section}'s rows in a file "
            f"of their own for {section}.source, and remove {section}.split"
        )
    path = Path(source)
    if not path.is_file():
        raise UserError(f"dataset file {path} does not exist; check {section}.source")
    if path.stat().st_size == 0:
        raise UserError(f"dataset file {path} is empty; add samples to it or fix {section}.source")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = _parquet_rows(path)
    elif suffix == ".csv":
        rows = _csv_rows(path)
    elif suffix in (".json", ".jsonl"):
        rows = json_rows(path)
    else:
        raise UserError(f"dataset file {path}: unknown type {suffix!r}; use .json, .jsonl, .csv or .parquet")
    count = 0
    for number, row in rows:
        where = f"dataset file {path}, row {number}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: a row must be an object with named columns, not {type(row).__name__}")
        count += 1
        yield where, row
    if count == 0:
        raise UserError(f"dataset file {path} has no rows; add samples to it or fix {section}.source")


def read_text(path: Path) -> str:
    """A local data file's text; not UTF-8 is one line with the byte where decoding stopped."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") is not part of the text
    except UnicodeDecodeError as e:
        raise UserError(
            f"dataset file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8 and run again"
        )


def json_rows(path: Path, field: str | None = None) -> Iterator[tuple[int, object]]:
    """(row number, row) of a JSON file: an array (rows numbered from 1), one object (with ``field``: the array
    it holds under that key, as ``datasets``' json loader reads it), or JSON Lines (rows numbered by line)."""
    text = read_text(path)
    head = text.lstrip()[:1]
    if head in ("[", "{"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as e:
            if head == "[":
                raise UserError(f"dataset file {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})")
            document = None  # JSON Lines
        if isinstance(document, dict) and field is not None:
            document = document.get(field, [])
        if isinstance(document, list):
            yield from enumerate(document, start=1)
            return
        if document is not None:
            yield 1, document
            return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"dataset file {path} is not valid JSON (line {number}, column {e.colno}: {e.msg}); each line"
                " of a JSON Lines file must be one JSON object"
            )


def _csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """Rows numbered from 1 after the header line."""
    csv.field_size_limit(2**31 - 1)  # a long conversation in one cell is data, not a damaged file
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        for number, row in enumerate(reader, start=1):
            if None in row:
                raise UserError(
                    f"dataset file {path}, row {number}: more fields than the header has columns; "
                    "quote fields that contain commas"
                )
            yield number, row
    except csv.Error as e:
        raise UserError(f"dataset file {path}, row {reader.line_num}: not valid CSV ({e})")


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise UserError(f"dataset file {path} is not a readable parquet file ({e}); write it again")
    yield from enumerate(table.to_pylist(), start=1)


def _hub_rows(source: str, split: str, section: str) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # offline, unknown name, private dataset: datasets raises many kinds
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{section}.source {source!r} is not a local file and could not be loaded from the Hugging Face Hub "
            f"({first}); check the path or name, and the network for Hub datasets"
        )
    for number, row in enumerate(ds, start=1):
        yield f"{source} ({split}), row {number}", row


def _column(where: str, row: dict, column: str, setting: str) -> object:
    if column not in row:
        has = ", ".join(map(str, list(row)[:8])) or "no columns"
        raise UserError(f"{where}: no '{column}' column (the row has: {has}); fix the row or set {setting}")
    return row[column]


def conversation(where: str, row: dict, column: str, section: str) -> list[dict]:
    """The row's messages as ``[{"role", "content"}]`` with roles system/user/assistant, checked."""
    messages = _column(where, row, column, f"{section}.conversation_column")
    if isinstance(messages, str):  # CSV cells, or a JSON string column
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: column '{column}' is not JSON ({e.msg}); it must hold a list of messages")
    if not isinstance(messages, list):
        raise UserError(f"{where}: column '{column}' holds {type(messages).__name__}, not a list of messages")
    if not messages:
        raise UserError(f"{where}: the conversation is empty; remove the row or add its messages")
    out = []
    for n, message in enumerate(messages, start=1):
        at = f"{where}, message {n}"
        if not isinstance(message, dict):
            raise UserError(f"{at}: a message must be an object with role and content, not {type(message).__name__}")
        if "role" in message and "content" in message:
            role, content = message["role"], message["content"]
        elif "from" in message and "value" in message:
            role, content = message["from"], message["value"]
        else:
            keys = ", ".join(map(str, message)) or "none"
            raise UserError(
                f"{at}: keys {keys}; a message needs role and content (OpenAI style) or from and value (ShareGPT)"
            )
        if not isinstance(role, str) or role not in ROLES:
            raise UserError(
                f"{at}: unknown role {str(role)[:30]!r}; use system, user or assistant (ShareGPT: system, human, gpt)"
            )
        if not isinstance(content, str):
            raise UserError(f"{at}: content is {type(content).__name__}, not text; write the message as a string")
        out.append({"role": ROLES[role], "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: the conversation has no assistant turn, so nothing to learn; add one or remove it")
    return out


def instruction(
    where: str,
    row: dict,
    prompt_column: str,
    completion_column: str,
    input_column: str | None,
    system_prompt: str | None,
    section: str,
) -> list[dict]:
    """An instruction row as a conversation: the prompt (and its input after a blank line), then the answer."""
    texts = {}
    for key, column in (("prompt", prompt_column), ("completion", completion_column), ("input", input_column)):
        if column is None:
            continue
        value = _column(where, row, column, f"{section}.{key}_column")
        if value is None and key == "input":
            value = ""
        if not isinstance(value, str):
            raise UserError(f"{where}: column '{column}' is {type(value).__name__}, not text; fix the row")
        texts[key] = value
    if not texts["completion"].strip():
        raise UserError(f"{where}: column '{completion_column}' is empty, so nothing to learn; fix or remove the row")
    prompt = texts["prompt"] + (f"\n\n{texts['input']}" if texts.get("input") else "")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": texts["completion"]}]
