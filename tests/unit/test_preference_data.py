"""Unit tier: preference pairs (lora_tools.data.preference) read from every row format and file type, truncated
from the left, summarized, and each bad row refused in one line."""

import csv
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX as IGNORE
from torchtune.models.llama3 import llama3_tokenizer

from lora_tools.data import __main__ as data_command
from lora_tools.data.chat_template import ChatFormat
from lora_tools.data.preference import PairSummary, preference_dataset
from lora_tools.errors import UserError

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "assets" / "tiny"


def _tokenizer(max_seq_len=None):
    return llama3_tokenizer(
        path=str(TINY / "original/tokenizer.model"),
        special_tokens_path=str(TINY / "special_tokens.json"),
        max_seq_len=max_seq_len,
    )


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _pairs(tmp_path, rows, max_seq_len=None, **kwargs):
    return preference_dataset(
        _tokenizer(max_seq_len), _jsonl(tmp_path / "p.jsonl", rows), chat_template=str(TINY), **kwargs
    )


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _expected(prompt: list[dict], chosen: str, rejected: str) -> dict:
    """The item the rules give, from the chat format's own rendering: prompt = the generation prompt's ids,
    each sequence = the rendered prompt + response, its labels the ids after the prompt."""
    fmt = ChatFormat(_tokenizer(), str(TINY))
    prompt_ids = fmt.prompt(prompt)
    item = {}
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        ids = fmt.encode(fmt.render([*prompt, _assistant(text)]))
        assert ids[: len(prompt_ids)] == prompt_ids
        item[f"{name}_tokens"] = ids
        item[f"{name}_labels"] = [IGNORE] * len(prompt_ids) + ids[len(prompt_ids) :]
    return item


SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [_user("Hi"), _assistant("Hello."), _user("What is 2+2?")]


def test_string_rows_are_user_prompt_and_assistant_responses(tmp_path):
    ds = _pairs(tmp_path, [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}])
    assert ds[0] == _expected([_user("What is 2+2?")], "4", "5")
    eot = _tokenizer().special_tokens["<|eot_id|>"]
    trained = [label for label in ds[0]["chosen_labels"] if label != IGNORE]
    assert trained[-1] == eot and len(trained) == ds.chosen_lengths[0] == 2  # "4" and <|eot_id|>


def test_system_prompt_goes_before_prompts_without_one(tmp_path):
    rows = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [SYSTEM, _user("Hi")], "chosen": "Hello.", "rejected": "Go."},
    ]
    ds = _pairs(tmp_path, rows, system_prompt="Answer in digits.")
    assert ds[0] == _expected([{"role": "system", "content": "Answer in digits."}, _user("What is 2+2?")], "4", "5")
    assert ds[1] == _expected([SYSTEM, _user("Hi")], "Hello.", "Go.")  # its own system message stays


def test_trl_conversational_rows(tmp_path):
    rows = [
        {"prompt": [SYSTEM, *TURNS], "chosen": [_assistant("4")], "rejected": [_assistant("5")]},
        {"prompt": TURNS, "chosen": "4", "rejected": [_assistant("22")]},  # a string response is one message
    ]
    ds = _pairs(tmp_path, rows)
    assert [ds[0], ds[1]] == [_expected([SYSTEM, *TURNS], "4", "5"), _expected(TURNS, "4", "22")]


def test_hh_conversations_share_their_prompt(tmp_path):
    chosen, rejected = [*TURNS, _assistant("4")], [*TURNS, _assistant("22")]
    same = [SYSTEM, *TURNS, _assistant("4")]
    ds = _pairs(tmp_path, [{"chosen": chosen, "rejected": rejected}, {"chosen": same, "rejected": same}])
    assert ds[0] == _expected(TURNS, "4", "22")
    assert ds[1] == _expected([SYSTEM, *TURNS], "4", "4")  # one conversation twice: its last answer, identical
    assert ds.identical == [False, True]


def test_hh_raw_text_reads_as_its_messages(tmp_path):
    text = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: What is 2+2?\n\nAssistant: "
    row = {"chosen": text + "4", "rejected": text + "It is 22.\n\nOr so."}
    assert _pairs(tmp_path, [row])[0] == _expected(TURNS, "4", "It is 22.\n\nOr so.")


def test_sharegpt_keys(tmp_path):
    def sharegpt(messages):
        names = {"user": "human", "assistant": "gpt", "system": "system"}
        return [{"from": names[m["role"]], "value": m["content"]} for m in messages]

    rows = [
        {"prompt": sharegpt([SYSTEM, *TURNS]), "chosen": sharegpt([_assistant("4")]), "rejected": "5"},
        {"chosen": sharegpt([*TURNS, _assistant("4")]), "rejected": sharegpt([*TURNS, _assistant("5")])},
    ]
    ds = _pairs(tmp_path, rows)
    assert [ds[0], ds[1]] == [_expected([SYSTEM, *TURNS], "4", "5"), _expected(TURNS, "4", "5")]


def test_other_column_names(tmp_path):
    rows = [{"question": "What is 2+2?", "good": "4", "bad": "5"}]
    ds = _pairs(tmp_path, rows, prompt_column="question", chosen_column="good", rejected_column="bad")
    assert ds[0] == _expected([_user("What is 2+2?")], "4", "5")


ROWS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": 'Name a colour, "quoted", with commas.', "chosen": "Blue.", "rejected": "Seven."},
]


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet"])
def test_every_file_type(tmp_path, kind):
    path = tmp_path / f"pairs.{kind}"
    if kind == "json":
        path.write_text(json.dumps(ROWS), encoding="utf-8")
    elif kind == "jsonl":
        _jsonl(path, ROWS)
    elif kind == "csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, ["prompt", "chosen", "rejected"])
            writer.writeheader()
            writer.writerows(ROWS)
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    ds = preference_dataset(_tokenizer(), str(path), chat_template=str(TINY))
    assert [ds[0], ds[1]] == [_expected([_user(r["prompt"])], r["chosen"], r["rejected"]) for r in ROWS]


def test_csv_cells_of_json_message_lists(tmp_path):
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "chosen", "rejected"])
        writer.writerow([json.dumps([SYSTEM, *TURNS]), json.dumps([_assistant("4")]), "5"])
        writer.writerow(["[1, 2] is a list", "yes", "no"])  # JSON, but not messages: the text itself
    ds = preference_dataset(_tokenizer(), str(path), chat_template=str(TINY))
    assert [ds[0], ds[1]] == [
        _expected([SYSTEM, *TURNS], "4", "5"),
        _expected([_user("[1, 2] is a list")], "yes", "no"),
    ]


def test_long_prompts_are_cut_from_the_left(tmp_path):
    long_prompt = " ".join(f"word{i}" for i in range(200))
    rows = [
        {"prompt": "short", "chosen": "yes", "rejected": "no"},
        {"prompt": long_prompt, "chosen": "A longer answer than the other one.", "rejected": "Short."},
    ]
    full = _pairs(tmp_path, rows)
    max_seq_len = 120
    assert full.prompt_lengths[1] + full.chosen_lengths[1] > max_seq_len >= full.prompt_lengths[0] + 3
    cut = _pairs(tmp_path, rows, max_seq_len=max_seq_len)
    assert cut[0] == full[0]
    kept = max_seq_len - full.chosen_lengths[1]  # the longer response, whole, and the prompt's last tokens
    for name in ("chosen", "rejected"):
        response = full[1][f"{name}_tokens"][full.prompt_lengths[1] :]
        assert cut[1][f"{name}_tokens"] == full[1][f"{name}_tokens"][full.prompt_lengths[1] - kept :]
        assert cut[1][f"{name}_labels"] == [IGNORE] * kept + response
    assert len(cut[1]["chosen_tokens"]) == max_seq_len
    summary = cut.summary()
    assert (summary.truncated, summary.tokens_cut) == (1, full.prompt_lengths[1] - kept)
    assert summary.full_lengths == full.summary().lengths
    lines = summary.lines("dataset")
    assert (
        f"prompts cut from the left to fit tokenizer.max_seq_len 120: 1 pairs (50.0%), {summary.tokens_cut}" in lines[1]
    )
    assert "1 of 2 pairs (50.0%) are longer than tokenizer.max_seq_len=120" in summary.truncation_warning("dataset")
    assert full.summary().truncation_warning("dataset") is None


def test_summary_counts_pairs_tokens_and_identical_pairs(tmp_path):
    rows = [
        {"prompt": "a", "chosen": "same", "rejected": "same"},
        {"prompt": "b", "chosen": "x", "rejected": "y"},
        {"prompt": "c", "chosen": " same ", "rejected": "same"},  # the template trims: the same tokens
    ]
    ds = _pairs(tmp_path, rows)
    summary = ds.summary()
    assert summary.identical_pairs == 2
    assert summary.lines("dataset")[-1] == "dataset: pairs whose chosen and rejected responses are the same tokens: 2"
    assert summary.identical_warning("dataset").startswith("dataset: 2 of 3 pairs have the same chosen and rejected")
    assert summary.warnings("dataset") == [summary.identical_warning("dataset")]
    tokens = sum(len(ds[i]["chosen_tokens"]) + len(ds[i]["rejected_tokens"]) for i in range(3))
    trained = sum(label != IGNORE for i in range(3) for k in ("chosen", "rejected") for label in ds[i][f"{k}_labels"])
    assert summary.lines("dataset")[0].startswith(f"dataset: 3 preference pairs, {tokens:,} tokens in the chosen")
    assert f"{trained:,} of them trained" in summary.lines("dataset")[0]
    assert len(summary.lines("dataset")) == 2  # no max_seq_len: no truncation line
    assert _pairs(tmp_path, rows[1:2]).summary().warnings("dataset") == []
    summary.require_trained_tokens("dataset")
    with pytest.raises(UserError, match="no pair of dataset keeps a response token"):
        PairSummary([5], [5], [0], [0], [True], None).require_trained_tokens("dataset")


def test_show_pairs_from_the_data_command(tmp_path, capsys):
    source = _jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2+2?", "chosen": "four", "rejected": "four"}])
    overrides = [
        "dataset._component_=lora_tools.data.preference.preference_dataset",
        f"dataset.source={source}",
        "~dataset.conversation_column",
        "~dataset.train_on",
        "~val_dataset",
    ]
    assert data_command.main(["--config", str(REPO / "configs/tiny_chat.yaml"), *overrides]) == 0
    out = capsys.readouterr().out
    assert "--- pair 0 (prompt " in out and out.count("What is 2+2?") == 1
    assert "\nchosen: «four<|eot_id|>»\nrejected: «four<|eot_id|>»\n" in out
    assert "dataset: 1 preference pairs" in out
    assert "warning: dataset: 1 of 1 pairs have the same chosen and rejected response" in out


def _refusal(tmp_path, rows, max_seq_len=None, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        _pairs(tmp_path, rows, max_seq_len, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_refusals_name_the_row_and_the_fix(tmp_path):
    at = f"dataset file {tmp_path / 'p.jsonl'}, row 2"  # then ": " or ", column ..., message n: "
    ok = {"prompt": "q", "chosen": "a", "rejected": "b"}

    def refused(row, **kwargs):
        message = _refusal(tmp_path, [ok, row], **kwargs)
        assert message.startswith(at) and message[len(at)] in ":,", message
        return message[len(at) + 2 :]

    assert refused({"prompt": "q", "rejected": "b"}) == (
        "no 'chosen' column (the row has: prompt, rejected); fix the row or set dataset.chosen_column"
    )
    assert refused({"prompt": "q", "chosen": "a", "answer": "b"}) == (
        "no 'rejected' column (the row has: prompt, chosen, answer); fix the row or set dataset.rejected_column"
    )
    assert "chosen and rejected share no first message, so there is no prompt" in refused(
        {"chosen": [_user("x"), _assistant("a")], "rejected": [_user("y"), _assistant("b")]}
    )
    assert "chosen and rejected first differ at message 3, a user message" in refused(
        {"chosen": [*TURNS, _assistant("a")], "rejected": [*TURNS[:2], _user("other"), _assistant("b")]}
    )
    assert "the rejected conversation has no response after the turns the two share" in refused(
        {"chosen": [*TURNS, _assistant("a")], "rejected": TURNS}
    )
    assert "without a prompt column each of chosen and rejected must be a whole conversation" in refused(
        {"chosen": "a", "rejected": "b"}
    )
    assert refused({"prompt": "q", "chosen": "  \n", "rejected": "b"}) == (
        "the chosen response is empty; write it or remove the row"
    )
    assert refused({"prompt": "q", "chosen": "a", "rejected": [_assistant("")]}) == (
        "the rejected response is empty; write it or remove the row"
    )
    assert refused({"prompt": "q", "chosen": [_user("a")], "rejected": "b"}).startswith(
        "the chosen response is a user message; it must be one assistant message"
    )
    assert refused({"prompt": "q", "chosen": [_assistant("a"), _user("b"), _assistant("c")], "rejected": "b"}) == (
        "the chosen response is 3 messages (assistant, user, assistant); it must be one assistant message (earlier "
        "turns belong in the prompt)"
    )
    assert refused({"prompt": "q", "chosen": [], "rejected": "b"}).startswith(
        "the chosen response is 0 messages (none)"
    )
    assert refused({"prompt": [{"role": "critic", "content": "x"}], "chosen": "a", "rejected": "b"}) == (
        "column 'prompt', message 1: unknown role 'critic'; use system, user, assistant or tool (ShareGPT: system, "
        "human, gpt, function_call, observation)"
    )
    assert refused({"prompt": [], "chosen": "a", "rejected": "b"}).startswith("column 'prompt' is empty")
    assert refused({"prompt": "q", "chosen": 3, "rejected": "b"}).startswith("column 'chosen' holds int")


def test_a_response_too_long_for_max_seq_len_is_refused(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": " ".join(["word"] * 50)}]
    rejected = _pairs(tmp_path, rows).rejected_lengths[0]
    message = _refusal(tmp_path, rows, max_seq_len=rejected)
    assert message == (
        f"dataset file {tmp_path / 'p.jsonl'}, row 1: the rejected response is {rejected} tokens, leaving no room for "
        f"the prompt within tokenizer.max_seq_len {rejected}; raise tokenizer.max_seq_len or shorten the response"
    )
    one_prompt_token = _pairs(tmp_path, rows, max_seq_len=rejected + 1)  # room for one prompt token: kept
    assert one_prompt_token.prompt_lengths == [1]


def test_packed_is_refused(tmp_path):
    assert _refusal(tmp_path, ROWS, packed=True) == (
        "dataset.packed is True, but preference pairs are not packed; remove dataset.packed"
    )


def test_docs_examples_read_as_the_page_says(tmp_path):
    """docs/data.md's preference examples: each row one pair; HH's text form is the same pair as its messages."""
    page = (REPO / "docs" / "data.md").read_text(encoding="utf-8")
    examples = dict(re.findall(r"<!-- pairs example: (\S+) -->\n```json\n(.*?)```", page, re.S))
    assert set(examples) == {"pairs.jsonl", "conversational.jsonl", "hh.jsonl", "hh_text.jsonl"}
    read = {}
    for name, text in examples.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        read[name] = preference_dataset(_tokenizer(), str(tmp_path / name), chat_template=str(TINY))
    assert {name: len(ds) for name, ds in read.items()} == {
        "pairs.jsonl": 2,
        "conversational.jsonl": 2,
        "hh.jsonl": 1,
        "hh_text.jsonl": 1,
    }
    times_three = [_user("2 + 2?"), _assistant("4"), _user("And times 3?")]
    assert read["hh.jsonl"][0] == read["hh_text.jsonl"][0] == _expected(times_three, "12", "7")
    assert read["conversational.jsonl"][1] == read["hh.jsonl"][0]
