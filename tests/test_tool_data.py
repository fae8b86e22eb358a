"""Tool-calling conversations and message parts, rendered with Llama 3.2 Instruct's own template (the tiny assets
carry it): token for token what transformers' apply_chat_template gives with tools=, and the trained mask."""

import json
import subprocess
from pathlib import Path

import pytest
from conftest import HF_PYTHON, REPO, TINY, assistant_spans
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.models.llama3 import llama3_tokenizer

from lora_tools.data import records
from lora_tools.data.sft import conversation_dataset
from lora_tools.errors import UserError

DATE = {"date_string": "26 Jul 2024"}  # the date our renderer gives templates (chat_template.TEMPLATE_DATE)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
COLOR = json.loads((TINY / "data/tools.json").read_text())[0]


def _call(name: str, arguments: dict, as_text: bool, n: int) -> dict:
    args = json.dumps(arguments, ensure_ascii=False) if as_text else arguments
    return {"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": args}}


def _round(question: str, name: str, arguments: dict, result, answer: str, as_text: bool, n: int) -> list[dict]:
    """user -> assistant call -> tool result -> assistant answer, as OpenAI's API writes them."""
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [_call(name, arguments, as_text, n)]},
        {"role": "tool", "tool_call_id": f"call_{n}", "content": result},
        {"role": "assistant", "content": answer},
    ]


def _tool_conversations() -> list[dict]:
    """20 conversations: schemas in the first user message and in the system block, one and two rounds, arguments
    as an object and as JSON text, unicode arguments, system messages, a result given as a JSON object."""
    out = []
    cities = ["Paris", "Zürich", "東京", "São Paulo", "Reykjavík"]
    for i in range(20):
        as_text, in_system = i % 2 == 1, i % 4 >= 2
        city = cities[i % len(cities)]
        messages = _round(
            f"What is the weather in {city}?", "get_weather", {"city": city, "unit": "celsius"},
            {"temperature": 20 + i, "sky": "clear ☀"} if i % 5 == 0 else f"{20 + i} degrees, clear",
            f"It is {20 + i} degrees in {city}.", as_text, 2 * i,
        )  # fmt: skip
        if i % 3 == 0:  # a second round, with the other tool
            thing = ["lemon", "ocean", "snow"][i // 3 % 3]
            messages += _round(f"And the color of the {thing}?", "lookup_color", {"thing": thing}, "yellow",
                               f"The {thing} is yellow.", not as_text, 2 * i + 1)  # fmt: skip
        if i % 7 == 1:
            messages = [{"role": "system", "content": "Answer with the tools. Réponds brièvement."}, *messages]
        if i % 6 == 5:  # a plain turn after the tool rounds
            messages += [{"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You're welcome."}]
        kwargs = {"tools_in_user_message": False} if in_system else {}
        out.append({"messages": messages, "tools": [WEATHER, COLOR], "kwargs": kwargs})
    return out


CONVERSATIONS = _tool_conversations()


def _tokenizer():
    return llama3_tokenizer(
        str(TINY / "original/tokenizer.model"), special_tokens_path=str(TINY / "special_tokens.json")
    )


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _parsed(messages: list[dict]) -> list[dict]:
    """The messages with every call's arguments as an object: what templates read, and what vLLM passes them."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": records.tool_call("", c)["function"]["arguments"]}}
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """transformers' apply_chat_template(messages, tools=tools, date_string=...) on the tiny tokenizer files."""
    tmp = tmp_path_factory.mktemp("hf_tools")
    conversations = [{**c, "messages": _parsed(c["messages"])} for c in CONVERSATIONS]
    (tmp / "in.json").write_text(json.dumps({"conversations": conversations, "kwargs": DATE}), encoding="utf-8")
    cmd = [
        str(HF_PYTHON),
        str(REPO / "tests/hf_chat_template.py"),
        str(TINY),
        str(tmp / "in.json"),
        str(tmp / "o.json"),
    ]
    subprocess.run(cmd, check=True, timeout=300)
    return json.loads((tmp / "o.json").read_text(encoding="utf-8"))


def _datasets(tmp_path: Path, conversations: list[dict], parts: bool = False) -> list[dict]:
    """Each conversation's sample as the recipe builds it: a tools column per row, the schemas-in-system ones with
    chat_template_kwargs tools_in_user_message: False."""
    samples = []
    for n, c in enumerate(conversations):
        source = _write_jsonl(tmp_path / f"c{n}.jsonl", [{"messages": c["messages"], "tools": c["tools"]}])
        ds = conversation_dataset(_tokenizer(), str(source), chat_template=str(TINY), chat_template_kwargs=c["kwargs"])
        samples.append(ds[0])
    return samples


def test_tool_conversations_match_transformers_token_for_token(tmp_path, hf):
    """Ids equal apply_chat_template's with tools=; trained: the assistant turns, each call's JSON and end-of-turn
    included, and no token of a tool result or of the schemas."""
    assert len(CONVERSATIONS) == 20
    header, eot = hf["assistant_header"], hf["eot"]
    for i, (sample, expected) in enumerate(zip(_datasets(tmp_path, CONVERSATIONS), hf["conversations"], strict=True)):
        assert sample["tokens"] == expected["ids"], (i, expected["text"])
        trained = [label != CROSS_ENTROPY_IGNORE_IDX for label in sample["labels"]]
        assert trained == assistant_spans(expected["ids"], header, eot), i
        text = expected["text"]
        assert "Environment: ipython\n" in text and '{"name": "get_weather", "parameters": {"city": ' in text
        assert text.count("<|start_header_id|>ipython<|end_header_id|>") == sum(
            m["role"] == "tool" for m in CONVERSATIONS[i]["messages"]
        )
        in_system = CONVERSATIONS[i]["kwargs"].get("tools_in_user_message") is False
        assert ("You have access to the following functions" in text) == in_system
        assert ("Given the following functions" in text) == (not in_system)
        # no result token trained: the ipython turns' content is all prompt
        tok = _tokenizer()
        for turn in text.split("<|start_header_id|>ipython<|end_header_id|>\n\n")[1:]:
            result = turn.split("<|eot_id|>")[0]
            trained_text = tok.decode([t for t, keep in zip(sample["tokens"], trained, strict=True) if keep])
            assert result not in trained_text


def test_arguments_as_text_give_the_tokens_of_arguments_as_an_object(tmp_path):
    """OpenAI writes arguments as JSON text; the template prints an object. Both forms give the same ids."""
    as_text = CONVERSATIONS[1:6:2]  # arguments as JSON text in the first round
    as_objects = [{**c, "messages": _parsed(c["messages"])} for c in as_text]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = _datasets(tmp_path / "a", as_text), _datasets(tmp_path / "b", as_objects)
    assert [s["tokens"] for s in a] == [s["tokens"] for s in b]


def _as_parts(messages: list[dict]) -> list[dict]:
    """String contents as lists of text parts, split at their first newline (parts are joined with one)."""
    out = []
    for m in messages:
        if isinstance(m.get("content"), str) and m["content"]:
            pieces = m["content"].split("\n", 1)
            m = {**m, "content": [{"type": "text", "text": p} for p in pieces]}
        out.append(m)
    return out


def test_message_parts_give_the_tokens_of_string_content(tmp_path):
    """Text parts, as OpenAI's multimodal message format writes text, give the tokens of the same text as a string:
    the 24 own-data conversations and the 20 tool conversations."""
    from test_own_data import CONVERSATIONS as PLAIN

    plain = [{"messages": m, "tools": None, "kwargs": {}} for m in PLAIN]
    everything = plain + CONVERSATIONS
    with_parts = [{**c, "messages": _as_parts(c["messages"])} for c in everything]
    assert any(len(m["content"]) > 1 for c in with_parts for m in c["messages"] if isinstance(m["content"], list))
    (tmp_path / "s").mkdir()
    (tmp_path / "p").mkdir()
    strings, parts = _datasets(tmp_path / "s", everything), _datasets(tmp_path / "p", with_parts)
    for i, (s, p) in enumerate(zip(strings, parts, strict=True)):
        assert s == p, i


def test_sharegpt_tool_exports_map_onto_the_same_messages(tmp_path):
    """A glaive-style ShareGPT row (function_call and observation turns, tools as JSON text) gives the ids of the
    same conversation in OpenAI's format."""
    openai = {"messages": _round("What color is the plum?", "lookup_color", {"thing": "plum"}, "purple",
                                 "The plum is purple.", False, 0), "tools": [COLOR]}  # fmt: skip
    for m in openai["messages"]:
        m.pop("tool_call_id", None)
        for c in m.get("tool_calls") or []:
            c.pop("id")
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "What color is the plum?"},
            {"from": "function_call", "value": json.dumps({"name": "lookup_color", "arguments": {"thing": "plum"}})},
            {"from": "observation", "value": "purple"},
            {"from": "gpt", "value": "The plum is purple."},
        ],
        "tools": json.dumps([COLOR]),
    }
    a = conversation_dataset(_tokenizer(), str(_write_jsonl(tmp_path / "a.jsonl", [openai])), chat_template=str(TINY))
    b = conversation_dataset(
        _tokenizer(),
        str(_write_jsonl(tmp_path / "b.jsonl", [sharegpt])),
        chat_template=str(TINY),
        conversation_column="conversations",
    )
    assert a[0] == b[0]


def test_a_tools_file_is_every_rows_tools_and_a_column_wins(tmp_path):
    row = {"messages": _round("What color is the plum?", "lookup_color", {"thing": "plum"}, "purple",
                              "The plum is purple.", False, 0)}  # fmt: skip
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps([COLOR]))
    source = _write_jsonl(tmp_path / "a.jsonl", [row, {**row, "tools": [WEATHER]}, {**row, "tools": []}])
    ds = conversation_dataset(_tokenizer(), str(source), chat_template=str(TINY), tools=str(tools_file))
    texts = [_tokenizer().decode(ds[i]["tokens"], skip_special_tokens=False) for i in range(3)]
    assert '"name": "lookup_color"' in texts[0].split("What color")[0]
    assert '"name": "get_weather"' in texts[1] and '"description": "Look up the color' not in texts[1]
    assert "Environment: ipython" not in texts[2]  # an empty list is no tools


@pytest.mark.parametrize(
    "message, words",
    [
        ({"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}, "the call has no function name"),
        ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x: 1"}}]}, "not valid JSON"),
        ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}, "not an object"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "trains text models"),
        ({"role": "user", "content": [{"type": "text"}]}, "a text part without text"),
        ({"role": "user", "tool_calls": [{"function": {"name": "f"}}], "content": "x"}, "only assistant messages"),
    ],
)
def test_bad_messages_are_one_line(message, words):
    with pytest.raises(UserError) as e:
        records.message("data.jsonl, row 1, message 2", message)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("data.jsonl, row 1, message 2")
