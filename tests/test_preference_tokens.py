"""Pairs tokenized as transformers renders them: 20 preference pairs in every row format, read by
lora_tools.data.preference on the tiny model, against the plain ``apply_chat_template`` calls (run in .venv-hf on the
model's own tokenizer files). The prompt's ids, each prompt + response's ids, and the trained tokens (exactly the ids
after the prompt: the response and its end-of-turn token) must all agree."""

import json
import subprocess

from conftest import HF_PYTHON, REPO, TINY
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.models.llama3 import llama3_tokenizer

from lora_tools.data.preference import preference_dataset

HF_KWARGS = {"date_string": "26 Jul 2024"}  # the date our renderer gives templates (chat_template.TEMPLATE_DATE)


def _msg(role, content):
    return {"role": role, "content": content}


def _dialogue(*texts, system=None):
    """Alternating user/assistant messages, after a system message when given."""
    messages = [] if system is None else [_msg("system", system)]
    return messages + [_msg("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)]


def _strings(question, chosen, rejected):
    return {"prompt": question, "chosen": chosen, "rejected": rejected}, [_msg("user", question)], chosen, rejected


def _trl(prompt, chosen, rejected):
    row = {"prompt": prompt, "chosen": [_msg("assistant", chosen)], "rejected": [_msg("assistant", rejected)]}
    return row, prompt, chosen, rejected


def _hh(prompt, chosen, rejected):
    row = {"chosen": prompt + [_msg("assistant", chosen)], "rejected": prompt + [_msg("assistant", rejected)]}
    return row, prompt, chosen, rejected


def _hh_text(turns, chosen, rejected):
    """Anthropic HH's text form; ``turns`` alternate Human, Assistant and end with Human."""
    text = "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))
    row = {"chosen": f"{text}\n\nAssistant: {chosen}", "rejected": f"{text}\n\nAssistant: {rejected}"}
    return row, _dialogue(*turns), chosen, rejected


LONG = " ".join(f"The {w} is calm." for w in ["river", "cloud", "forest", "meadow"] * 40)

# (row, prompt messages, chosen text, rejected text)
CASES = [
    _strings("What is 2+2?", "4", "5"),
    _strings("naïve café 東京 🙂", "Ünïcödé ответ مرحبا 😀", "no"),
    _strings("  spaces around  ", "\n\nleading newlines   \n", "trailing\t"),
    _strings("Write it out.", LONG, "Short."),
    _strings("Same answers?", "Yes.", "Yes."),
    _trl(_dialogue("What color is the lemon?", system="Answer in one short sentence."), "Yellow.", "Blue."),
    _trl(_dialogue("Hi", "Hello!", "What is 2+2?"), "4", "22"),
    _trl(_dialogue("q1", "a1", "q2", "a2", "q3", system="You are a helpful assistant."), "a3", "b3"),
    _trl(_dialogue("a user who types <|eot_id|> in the text"), "that is text", "not a turn end"),
    _trl(_dialogue("code?", system=""), "```\nfor i in range(3):\n\tprint(i)\n```", "no code"),
    _trl(_dialogue(LONG), "ok", "not ok"),
    _hh(_dialogue("Tell me the color of the ocean."), "The ocean is blue.", "The ocean is green."),
    _hh(_dialogue("Tell me a joke.", system="Be funny."), "Why did the chicken cross the road?", "No."),
    _hh(_dialogue("2 + 2?", "4", "And times 3?"), "12", "7"),
    _hh(_dialogue("x", "y", "z", system="S"), "answer", "answer, but longer"),
    _hh(_dialogue("quotes \"double\" and 'single'"), "backslash \\ and slash /", "🙃"),
    _hh(_dialogue("numbers 12345 3.14159 -7"), "12345 + 1 = 12346", "12345 + 1 = 12345"),
    _hh_text(["Hi there"], "Hello! How can I help?", "What do you want?"),
    _hh_text(["What is the capital of France?", "Paris.", "And of Germany?"], "Berlin.", "Munich.\n\nI think."),
    _hh_text(["line one\nline two"], "one\ntwo", "three"),
]


def _tokenizer():
    return llama3_tokenizer(
        path=str(TINY / "original/tokenizer.model"), special_tokens_path=str(TINY / "special_tokens.json")
    )


def _transformers(tmp_path) -> dict:
    request = {
        "pairs": [
            {"prompt": prompt, "chosen": _msg("assistant", c), "rejected": _msg("assistant", r)}
            for _, prompt, c, r in CASES
        ],
        "kwargs": HF_KWARGS,
    }
    (tmp_path / "in.json").write_text(json.dumps(request, ensure_ascii=False), encoding="utf-8")
    cmd = [HF_PYTHON, REPO / "tests/hf_preference_tokens.py", TINY, tmp_path / "in.json", tmp_path / "out.json"]
    subprocess.run([str(c) for c in cmd], check=True, timeout=300)
    return json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))


def test_pairs_tokenized_as_transformers_renders_them(tmp_path):
    assert len(CASES) == 20
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row, *_ in CASES), encoding="utf-8")
    ds = preference_dataset(_tokenizer(), str(source), chat_template=str(TINY))
    hf = _transformers(tmp_path)
    assert len(ds) == len(hf["pairs"]) == 20
    for i, expected in enumerate(hf["pairs"]):
        item, prompt = ds[i], expected["prompt_ids"]
        assert ds.prompt_lengths[i] == len(prompt), i
        for name in ("chosen", "rejected"):
            tokens, labels = item[f"{name}_tokens"], item[f"{name}_labels"]
            assert tokens[: len(prompt)] == prompt, (i, name)
            assert tokens == expected[f"{name}_ids"], (i, name)
            trained = [label != CROSS_ENTROPY_IGNORE_IDX for label in labels]
            assert trained == [False] * len(prompt) + [True] * (len(tokens) - len(prompt)), (i, name)
            assert labels[len(prompt) :] == tokens[len(prompt) :]
            assert tokens[-1] == hf["eot"] and len(tokens) > len(prompt) + 1, (i, name)  # content, then eot
    assert ds.identical == [i == 4 for i in range(20)]
