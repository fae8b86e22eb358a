"""Rows of a user's data file (or Hub dataset) turned into conversations, each problem one line with its row.

Formats read: JSON (an array of rows), JSON Lines, CSV (a conversation column holds JSON text), parquet, and
whatever ``datasets.load_dataset`` reads by name (the Hugging Face Hub) or folder. Conversations come as
OpenAI-style messages (``role``/``content``) or ShareGPT (``from``/``value``, roles human/gpt/system);
instructions as columns mapped in the config.

Tool use, as OpenAI's chat format writes it: an assistant message with ``tool_calls`` (``arguments`` an object or
its JSON text; the older single ``function_call`` too), and ``tool`` (or ``ipython``, or the older ``function``)
messages with the results. ShareGPT exports of tool data (glaive style) write the call as a ``function_call``
turn holding ``{"name", "arguments"}`` JSON and the result as an ``observation`` turn; they map onto the same
messages. A message's content may be a list of parts (``{"type": "text", "text": ...}``): the text parts are
joined with newlines, as vLLM joins them for templates that read content as text.
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
# Tool results (OpenAI's "tool", its older "function", Llama's "ipython", ShareGPT's "observation"); and ShareGPT's
# call turn, which becomes an assistant message with tool_calls
ROLES.update({"tool": "tool", "ipython": "ipython", "function": "tool", "observation": "tool"})
ROLES.update({"function_call": "assistant"})
RESULT_ROLES = ("tool", "ipython")
ROLE_HELP = "use system, user, assistant or tool (ShareGPT: system, human, gpt, function_call, observation)"
NON_TEXT_PARTS = ("image", "image_url", "input_image", "audio", "input_audio", "video", "video_url", "file")


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
    """The row's messages, checked, in the form chat templates read (see ``message``)."""
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
    out = [message(f"{where}, message {n}", m) for n, m in enumerate(messages, start=1)]
    check_tool_order(where, out)
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: the conversation has no assistant turn, so nothing to learn; add one or remove it")
    return out


def message(at: str, raw: object) -> dict:
    """One message as chat templates read it: ``{"role", "content"}`` with role system, user, assistant, tool or
    ipython and text content; an assistant's calls as ``tool_calls`` (OpenAI's form, arguments as an object)."""
    if not isinstance(raw, dict):
        raise UserError(f"{at}: a message must be an object with role and content, not {type(raw).__name__}")
    if "role" in raw and ("content" in raw or "tool_calls" in raw or "function_call" in raw):
        role, content = raw["role"], raw.get("content")
    elif "from" in raw and "value" in raw:
        role, content = raw["from"], raw["value"]
    else:
        keys = ", ".join(map(str, raw)) or "none"
        raise UserError(
            f"{at}: keys {keys}; a message needs role and content (OpenAI style) or from and value (ShareGPT)"
        )
    if not isinstance(role, str) or role not in ROLES:
        raise UserError(f"{at}: unknown role {str(role)[:30]!r}; {ROLE_HELP}")
    if role == "function_call":  # ShareGPT: the turn's text is the call, {"name", "arguments"} or a list of them
        calls, content = _json_value(at, content, "the function_call turn"), ""
        calls = calls if isinstance(calls, list) else [calls]
    else:
        calls = raw.get("tool_calls") or ([raw["function_call"]] if raw.get("function_call") else [])
    out = {"role": ROLES[role], "content": _text(at, content, ROLES[role])}
    if calls:
        if out["role"] != "assistant":
            raise UserError(f"{at}: a {role} message has tool calls; only assistant messages make calls")
        if not isinstance(calls, list):
            raise UserError(f"{at}: tool_calls is {type(calls).__name__}, not a list of calls")
        out["tool_calls"] = [tool_call(f"{at}, tool call {k}", c) for k, c in enumerate(calls, start=1)]
    for key in ("tool_call_id", "name"):  # a result's link to its call, which some templates print
        if out["role"] in RESULT_ROLES and isinstance(raw.get(key), str):
            out[key] = raw[key]
    return out


def _text(at: str, content: object, role: str) -> object:
    """Text content: a string, or the text of a list of parts. A tool result may also be a JSON object or list
    (templates print it as JSON); an assistant message that only calls tools may have none."""
    if content is None and role in ("assistant", *RESULT_ROLES):
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict) and role in RESULT_ROLES:
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and "type" in p for p in content) and content:
        texts = []
        for part in content:
            kind = part["type"]
            if kind in NON_TEXT_PARTS or kind != "text" and "text" not in part:
                raise UserError(
                    f"{at}: a part of type {str(kind)[:20]!r}; this recipe trains text models, so give the "
                    "message as text parts only (or remove the rows with images, audio or video)"
                )
            if not isinstance(part.get("text"), str):
                raise UserError(f'{at}: a text part without text; give it as {{"type": "text", "text": ...}}')
            texts.append(part["text"])
        return "\n".join(texts)
    if isinstance(content, list) and role in RESULT_ROLES:
        return content
    raise UserError(
        f"{at}: content is {type(content).__name__}, not text; write the message as a string or a list of text parts"
    )


def tool_call(at: str, raw: object) -> dict:
    """One call in OpenAI's form ``{"type": "function", "function": {"name", "arguments"}}``, arguments parsed
    from JSON text (as OpenAI writes them) into the object templates print. Also read: ``{"name", "arguments"}``
    without the function wrapper, and ``parameters`` for ``arguments`` (Llama's own name)."""
    if not isinstance(raw, dict):
        raise UserError(f"{at}: a tool call must be an object with a function name and arguments")
    function = raw.get("function", raw)
    if not isinstance(function, dict):
        kind = type(function).__name__
        raise UserError(f"{at}: the call's function is {kind}, not an object with a name and arguments")
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise UserError(
            f"{at}: the call has no function name; write it as "
            '{"type": "function", "function": {"name": ..., "arguments": {...}}}'
        )
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _json_value(at, arguments, f"the arguments of {name}")
    if not isinstance(arguments, dict):
        raise UserError(f"{at}: the arguments of {name} are {type(arguments).__name__}, not an object of named values")
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(raw.get("id"), str):
        out["id"] = raw["id"]
    return out


def call_in_text(text: str) -> dict | None:
    """A model's answer read back as a tool call, when it is one: the JSON object Llama 3.2's template writes
    (``{"name": ..., "parameters": {...}}``, or ``arguments``), in OpenAI's form; None for any other answer."""
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("parameters", value.get("arguments", {}))
    if not isinstance(arguments, dict):
        return None
    return {"type": "function", "function": {"name": value["name"], "arguments": arguments}}


def _json_value(at: str, text: object, what: str) -> object:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{at}: {what} is not valid JSON ({e.msg} at column {e.colno}); write it as a JSON object")


def check_tool_order(where: str, messages: list[dict]) -> None:
    """A tool result must answer a call: it follows an assistant message with tool_calls, or another result."""
    for n, m in enumerate(messages, start=1):
        if m["role"] in RESULT_ROLES:
            before = messages[n - 2] if n > 1 else None
            if before is None or not (before["role"] in RESULT_ROLES or before.get("tool_calls")):
                raise UserError(
                    f"{where}, message {n}: a tool result with no tool call before it; put the assistant message "
                    "that calls the tool (tool_calls) first, or remove the result"
                )


def tools(where: str, value: object, source: str) -> list[dict] | None:
    """A conversation's tool schemas (OpenAI's function-calling JSON schemas), from its row's column or the dataset's
    tools file: a list of objects, or its JSON text. An empty list is no tools."""
    if value is None:
        return None
    if isinstance(value, str):
        value = _json_value(f"{where}: {source}", value, "the tools")
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise UserError(
            f"{where}: {source} holds {type(value).__name__}, not a list of tool schemas; give a JSON list such as "
            '[{"type": "function", "function": {"name": ..., "parameters": {...}}}]'
        )
    for t in value:
        name = t.get("function", t).get("name") if isinstance(t.get("function", t), dict) else None
        if not isinstance(name, str) or not name:
            raise UserError(f"{where}: {source} has a tool schema without a function name; give each one its name")
    return value or None


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
