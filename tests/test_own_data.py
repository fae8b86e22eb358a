"""Your own data: conversations and instructions in every format docs/data.md lists.

Each is rendered exactly as transformers' ``apply_chat_template`` renders the tiny model's chat template (run in
.venv-hf on the model's own tokenizer files), trained end to end, and summarized with counts the test makes itself.
"""

import csv
import io
import json
import re
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import HF_PYTHON, REPO, TINY, assistant_spans, logged_metrics
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.models.llama3 import llama3_tokenizer

from lora_tools import generate
from lora_tools.config.loader import load_config
from lora_tools.data import __main__ as data_command
from lora_tools.data.chat_template import ChatFormat
from lora_tools.data.sft import conversation_dataset, instruction_dataset
from lora_tools.eval.inference import PromptFormat

CHAT_CONFIG = "configs/tiny_chat.yaml"
HF_KWARGS = {"date_string": "26 Jul 2024"}  # the date our renderer gives templates (chat_template.TEMPLATE_DATE)
SYSTEM, QUESTION = "Answer in one short sentence.", "What color is the lemon?"


def _turns(*pairs: tuple[str, str], system: str | None = None) -> list[dict]:
    messages = [] if system is None else [{"role": "system", "content": system}]
    for user, assistant in pairs:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def _conversations() -> list[list[dict]]:
    """At least 20 conversations: with and without system, empty system, multi-turn, unicode, long, whitespace."""
    long_answer = " ".join(f"The {w} is calm." for w in ["river", "cloud", "forest", "meadow"] * 150)
    convs = [
        _turns((QUESTION, "The lemon is yellow."), system=SYSTEM),  # also the generate test's prompt
        _turns(("Give the opposite of the word.\nhot", "The opposite of hot is cold.")),
        _turns(("hi", "hello"), system=""),
        _turns(("a", "b"), ("c", "d"), ("e", "f")),
        _turns(("Tell me the color of the ocean.", "The ocean is blue."), ("And the forest?", "The forest is green.")),
        _turns(("naïve café 東京 🙂", "Ünïcödé ответ مرحبا 😀"), system="Réponds en français ✓"),
        _turns(("Write it out.", long_answer)),
        _turns((long_answer, "ok")),
        _turns(("  spaces around  ", "\n\nleading newlines and trailing spaces   \n")),
        _turns(("tabs\tand\ttabs", "code:\n```\nfor i in range(3):\n\tprint(i)\n```")),
        _turns(("numbers 12345 3.14159 -7", "12345 + 1 = 12346")),
        _turns(("a user who types <|eot_id|> in the text", "that is text, not a turn end")),
        _turns(("", "an empty question, answered")),
        _turns(("q1", "a1"), ("q2", "a2"), system="You are a helpful assistant."),
        _turns(("What is 2+2?", "four"), ("Sure?", "Yes, four."), ("Thanks!", "You're welcome.")),
        _turns(("emoji only 🙂🙂🙂", "🙃")),
        _turns(("line one\nline two\n\nline four", "one\ntwo")),
        _turns(("x" * 300, "y" * 300)),
        _turns(("quotes \"double\" and 'single'", "backslash \\ and slash /"), system="  padded system  "),
        _turns(("How many animals are in the list?\ncat, dog, tiger", "There are three animals.")),
        _turns(("Write the list in reverse order.\notter, panda, zebra", "zebra, panda, otter.")),
        _turns(("Add the two numbers and answer in words.\n2 and 3", "two plus three is five.")),
        [{"role": "user", "content": "last turn only?"}, {"role": "assistant", "content": "yes"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}],
    ]
    return convs


CONVERSATIONS = _conversations()
CHAT_TRAIN = [json.loads(line)["messages"] for line in (TINY / "data/chat_train.jsonl").read_text().splitlines()]


def _tokenizer(max_seq_len=None):
    return llama3_tokenizer(
        path=str(TINY / "original/tokenizer.model"),
        special_tokens_path=str(TINY / "special_tokens.json"),
        max_seq_len=max_seq_len,
    )


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """transformers' apply_chat_template on the tiny model's tokenizer files, for CONVERSATIONS + the chat set."""
    tmp = tmp_path_factory.mktemp("hf")
    request = {"conversations": CONVERSATIONS + CHAT_TRAIN, "kwargs": HF_KWARGS}
    (tmp / "in.json").write_text(json.dumps(request, ensure_ascii=False), encoding="utf-8")
    cmd = [
        str(HF_PYTHON),
        str(REPO / "tests/hf_chat_template.py"),
        str(TINY),
        str(tmp / "in.json"),
        str(tmp / "o.json"),
    ]
    subprocess.run(cmd, check=True, timeout=300)
    out = json.loads((tmp / "o.json").read_text(encoding="utf-8"))
    return out


def test_conversations_match_transformers_token_for_token(tmp_path, hf):
    """The recipe's tokens equal apply_chat_template's; the trained tokens are the assistant turns' content and
    their end-of-turn tokens, nothing else."""
    assert len(CONVERSATIONS) >= 20
    source = _write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in CONVERSATIONS])
    ds = conversation_dataset(_tokenizer(), str(source), chat_template=str(TINY))
    header, eot = hf["assistant_header"], hf["eot"]
    assert len(ds) == len(CONVERSATIONS)
    for i, expected in enumerate(hf["conversations"][: len(CONVERSATIONS)]):
        sample = ds[i]
        assert sample["tokens"] == expected["ids"], (i, expected["text"])
        trained = [label != CROSS_ENTROPY_IGNORE_IDX for label in sample["labels"]]
        assert trained == assistant_spans(expected["ids"], header, eot), i
        assert all(label == tok for label, tok in zip(sample["labels"], sample["tokens"], strict=True) if label >= 0)
    # the system block Llama 3.2's template always writes is there, with or without a system message
    assert all(
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" in c["text"] for c in hf["conversations"]
    )


def test_without_a_chat_template_it_is_torchtunes_llama3_format():
    """chat_template: null renders what torchtune's Llama 3 tokenizer gives for the same messages (but for the
    end-of-text token torchtune appends to each sample); here a sample's headers are not trained."""
    from torchtune.data import Message

    tokenizer = _tokenizer()
    fmt = ChatFormat(tokenizer, None)
    for messages in CONVERSATIONS:
        if any("<|" in m["content"] for m in messages):
            continue  # torchtune encodes special-token text in content as text; transformers as the token
        ids, _ = fmt.tokenize(messages)
        turns = [Message(role=m["role"], content=m["content"]) for m in messages]
        expected, _ = tokenizer.tokenize_messages(turns, add_end_tokens=True)
        assert ids == expected[:-1]


def test_generation_prompt_matches_transformers(hf):
    """What the recipe's sample answers and lora_tools.generate feed the model equals
    apply_chat_template(..., add_generation_prompt=True)."""
    cfg = load_config(["--config", CHAT_CONFIG])
    prompts = PromptFormat(cfg, _tokenizer())
    for messages, expected in zip(CONVERSATIONS, hf["conversations"], strict=False):
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        assert prompts.tokens(messages[:last]) == expected["prompt_ids"]


def test_train_on_last_and_all(tmp_path, hf):
    source = _write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[3]}])
    ids = hf["conversations"][3]["ids"]
    every = assistant_spans(ids, hf["assistant_header"], hf["eot"])
    last = conversation_dataset(_tokenizer(), str(source), train_on="last", chat_template=str(TINY))[0]
    last_trained = [label >= 0 for label in last["labels"]]
    start = max(i for i, t in enumerate(every) if t and not every[i - 1])
    assert last_trained == [t and i >= start for i, t in enumerate(every)] and sum(last_trained) < sum(every)
    everything = conversation_dataset(_tokenizer(), str(source), train_on="all", chat_template=str(TINY))[0]
    assert [label >= 0 for label in everything["labels"]] == [False] + [True] * (len(ids) - 1)


# --- formats: the same rows written as each file type ------------------------------------------------------------


def _csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, list) else v for k, v in row.items()})
    return out.getvalue()


def write_format(folder: Path, fmt: str, rows: list[dict]) -> Path:
    """rows in one of the formats: json (array), jsonl, csv (lists as JSON text), parquet."""
    path = folder / f"data.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif fmt == "jsonl":
        _write_jsonl(path, rows)
    elif fmt == "csv":
        path.write_text(_csv(rows), encoding="utf-8", newline="")
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _sharegpt(messages: list[dict]) -> list[dict]:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"from": names[m["role"]], "value": m["content"]} for m in messages]


def test_same_conversations_same_tokens_in_every_file_type(tmp_path):
    """JSONL, JSON, CSV and parquet, OpenAI messages or ShareGPT: identical token ids and labels."""
    rows = [{"messages": m} for m in CONVERSATIONS]
    results = {}
    for fmt in ("jsonl", "json", "csv", "parquet"):
        folder = tmp_path / fmt
        folder.mkdir()
        ds = conversation_dataset(_tokenizer(), str(write_format(folder, fmt, rows)), chat_template=str(TINY))
        results[fmt] = [ds[i] for i in range(len(ds))]
    # a CSV as Excel saves it ("CSV UTF-8": a byte-order mark first, CRLF line ends)
    excel = tmp_path / "excel.csv"
    excel.write_bytes(b"\xef\xbb\xbf" + _csv(rows).replace("\r\n", "\n").replace("\n", "\r\n").encode())
    ds = conversation_dataset(_tokenizer(), str(excel), chat_template=str(TINY))
    results["csv-excel"] = [ds[i] for i in range(len(ds))]
    sharegpt = write_format(tmp_path, "jsonl", [{"conversations": _sharegpt(m)} for m in CONVERSATIONS])
    ds = conversation_dataset(_tokenizer(), str(sharegpt), conversation_column="conversations", chat_template=str(TINY))
    results["sharegpt"] = [ds[i] for i in range(len(ds))]
    assert len(results["jsonl"]) == len(CONVERSATIONS)
    for fmt, samples in results.items():
        assert samples == results["jsonl"], fmt


def test_instructions_are_one_turn_conversations(tmp_path, hf):
    """An alpaca row and the same request as a prompt/completion pair give the tokens of the conversation
    [user: instruction + blank line + input, assistant: output]."""
    alpaca = json.loads((TINY / "data/train.json").read_text())[:30]
    conversations = [
        _turns(((r["instruction"] + "\n\n" + r["input"]) if r["input"] else r["instruction"], r["output"]))
        for r in alpaca
    ]
    expected = conversation_dataset(
        _tokenizer(), str(_write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in conversations])),
        chat_template=str(TINY),
    )  # fmt: skip
    ds = instruction_dataset(_tokenizer(), str(write_format(tmp_path, "json", alpaca)), chat_template=str(TINY))
    pairs = [{"prompt": c[0]["content"], "completion": c[1]["content"]} for c in conversations]
    pc = instruction_dataset(
        _tokenizer(), str(write_format(tmp_path, "csv", pairs)), prompt_column="prompt",
        completion_column="completion", input_column=None, chat_template=str(TINY),
    )  # fmt: skip
    for i in range(len(alpaca)):
        assert ds[i] == expected[i] == pc[i], i


# Each format end to end: (file type, rows builder, dataset overrides)
def _chat_rows(n=240):
    return [{"messages": m} for m in CHAT_TRAIN[:n]]


def _alpaca_rows(n=240):
    return json.loads((TINY / "data/train.json").read_text())[:n]


CONVERSATION = ("dataset._component_=lora_tools.sft_data.conversation_dataset",)
INSTRUCTION = (
    "dataset._component_=lora_tools.sft_data.instruction_dataset",
    "~dataset.conversation_column",
    "~dataset.train_on",
)
PROMPT_COMPLETION = (
    *INSTRUCTION,
    "dataset.prompt_column=prompt",
    "dataset.completion_column=completion",
    "dataset.input_column=null",
)
FORMATS = {
    "messages-jsonl": ("jsonl", _chat_rows, CONVERSATION),
    "messages-json": ("json", _chat_rows, CONVERSATION),
    "messages-csv": ("csv", _chat_rows, CONVERSATION),
    "messages-parquet": ("parquet", _chat_rows, CONVERSATION),
    "sharegpt-jsonl": (
        "jsonl",
        lambda: [{"conversations": _sharegpt(r["messages"])} for r in _chat_rows()],
        (*CONVERSATION, "dataset.conversation_column=conversations"),
    ),
    "alpaca-json": ("json", _alpaca_rows, INSTRUCTION),
    "alpaca-jsonl": ("jsonl", _alpaca_rows, INSTRUCTION),
    "prompt-completion-csv": (
        "csv",
        lambda: [{"prompt": r["instruction"] + " " + r["input"], "completion": r["output"]} for r in _alpaca_rows()],
        PROMPT_COMPLETION,
    ),
}


def _run_recipe(config: str, overrides: list[str]):
    """The recipe in-process through its `tune run` entry point; returns its exit status."""
    import sys

    import lora_finetune_single_device

    argv = sys.argv
    sys.argv = ["lora_finetune_single_device.py", "--config", config, *overrides]
    try:
        return lora_finetune_single_device.main()
    finally:
        sys.argv = argv


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_trains_the_tiny_model(name, tmp_path, caplog):
    """A file the test writes, 25 steps: the loss falls by a fifth. The start-up log holds the data summary."""
    suffix, rows, overrides = FORMATS[name]
    path = write_format(tmp_path, suffix, rows())
    out = tmp_path / "out"
    args = [
        f"output_dir={out}", *overrides, f"dataset.source={path}", "val_dataset=null", "sample_prompts=[]",
        "max_steps_per_epoch=25", "batch_size=4", "lr_scheduler.num_warmup_steps=5",
        "save_adapter_weights_only=True", "tokenizer.max_seq_len=256",
    ]  # fmt: skip
    assert _run_recipe(CHAT_CONFIG, args) == 0
    losses = [m["loss"] for _, m in sorted(logged_metrics(out).items()) if "loss" in m]
    assert len(losses) == 25
    print(f"{name}: loss {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f} (mean of the last 5)")
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses
    assert f"dataset: {len(rows())} samples" in caplog.text


def test_recipe_warns_once_when_samples_are_cut(tmp_path, caplog):
    """More than 1% of samples longer than max_seq_len: one warning line, with the count."""
    path = write_format(tmp_path, "jsonl", _chat_rows(40))
    full = conversation_dataset(_tokenizer(), str(path), chat_template=str(TINY))  # no max_seq_len: not cut
    lengths = sorted(len(full[i]["tokens"]) for i in range(40))
    limit = lengths[30]  # the 9 or so samples longer than the 31st are cut
    cut = sum(n > limit for n in lengths)
    assert 0.01 * 40 < cut < 40
    args = [
        f"output_dir={tmp_path}/out", f"dataset.source={path}", "val_dataset=null", "sample_prompts=[]",
        "max_steps_per_epoch=1", "batch_size=4", "save_adapter_weights_only=True", f"tokenizer.max_seq_len={limit}",
    ]  # fmt: skip
    assert _run_recipe(CHAT_CONFIG, args) == 0
    text = caplog.text
    warnings = [ln for ln in text.splitlines() if f"are longer than tokenizer.max_seq_len={limit}" in ln]
    assert len(warnings) == 1 and f"{cut} of 40 samples" in warnings[0], warnings


# --- the data command -------------------------------------------------------------------------------------------


def test_data_command_counts_truncation_as_transformers_does(hf, capsys):
    """lora_tools.data's truncated-sample and cut-token counts equal counts made here from transformers' ids."""
    lengths = [len(c["ids"]) for c in hf["conversations"][len(CONVERSATIONS) :]]
    assert len(lengths) == len(CHAT_TRAIN)
    limit = sorted(lengths)[int(0.9 * len(lengths))]
    cut = sum(n > limit for n in lengths)
    lost = sum(n - limit for n in lengths if n > limit)
    assert 0 < cut < len(lengths)
    status = data_command.main(["--config", CHAT_CONFIG, f"tokenizer.max_seq_len={limit}", "--show", "2"])
    out = capsys.readouterr().out
    assert status == 0, out
    share = f"{100 * cut / len(lengths):.1f}%"
    line = f"dataset: truncated at tokenizer.max_seq_len {limit}: {cut} samples ({share}), {lost:,} tokens cut"
    assert line in out.splitlines(), out
    assert f"dataset: {len(lengths)} samples" in out and "val_dataset: 100 samples" in out
    assert "--- sample 0" in out and "--- sample 1" in out and "--- sample 2" not in out
    # the marked text: every assistant answer of sample 0, with its end-of-turn token, between the marks
    first = out.split("--- sample 0")[1].split("--- sample 1")[0]
    answers = [m["content"] for m in CHAT_TRAIN[0] if m["role"] == "assistant"]
    assert re.findall(r"«(.*?)»", first, re.S) == [a + "<|eot_id|>" for a in answers]


def test_chat_demo_learns_and_generate_uses_the_served_prompt(chat_demo, hf, capsys):
    """`make demo-chat`: held-out loss on the assistant tokens down by at least 30% (its time is printed); then
    lora_tools.generate asks with apply_chat_template's prompt."""
    out, result, seconds = chat_demo
    val = {s: m["val_loss"] for s, m in sorted(logged_metrics(out).items()) if "val_loss" in m}
    assert val[max(val)] <= 0.7 * val[0], val
    print(f"make demo-chat: {seconds:.0f} s")
    # the start-up summary is the data command's
    assert data_command.main(["--config", CHAT_CONFIG, "--show", "0"]) == 0
    summary = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("dataset:", "val_dataset:"))]
    log = result.stdout + result.stderr
    assert summary and all(line in log for line in summary), summary

    ids_out = generate.main(
        ["--config", CHAT_CONFIG, f"output_dir={out}", "--system", SYSTEM, "--prompt", QUESTION,
         "--max-new-tokens", "8", "--print-prompt-ids"]
    )  # fmt: skip
    assert ids_out == 0
    # the merged model carries the base's tokenizer files, chat template included, byte for byte
    merged = out / "checkpoints" / "step_0000120" / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (merged / name).read_bytes() == (TINY / name).read_bytes(), name
    printed = capsys.readouterr().out
    (line,) = [ln for ln in printed.splitlines() if ln.startswith("prompt ids:")]
    assert [int(t) for t in line.split(":", 1)[1].split()] == hf["conversations"][0]["prompt_ids"]
    print(f"\nchat demo: {seconds:.0f} s, held-out loss {val[0]:.3f} -> {val[max(val)]:.3f}")


def test_shipped_3b_chat_config_runs_on_the_tiny_assets(tmp_path, caplog):
    """configs/llama3_2_3b_chat.yaml with only the model size, paths and device-level settings overridden: two
    steps on the generated conversations, rendered with the checkpoint folder's chat template."""
    from conftest import tiny_vocab_size

    out = tmp_path / "out"
    shape = {"num_layers": 4, "num_heads": 8, "num_kv_heads": 2, "embed_dim": 256, "intermediate_dim": 768}
    overrides = [
        "model._component_=torchtune.models.llama3_2.lora_llama3_2",
        f"model.vocab_size={tiny_vocab_size()}",
        "model.max_seq_len=2048",
        *(f"model.{k}={v}" for k, v in shape.items()),
        f"checkpointer.checkpoint_dir={TINY}",
        "checkpointer.checkpoint_files=[model.safetensors]",
        f"tokenizer.path={TINY}/original/tokenizer.model",
        f"tokenizer.special_tokens_path={TINY}/special_tokens.json",
        f"dataset.source={TINY}/data/chat_train.jsonl",
        f"val_dataset.source={TINY}/data/chat_heldout.jsonl",
        "device=cpu", "dtype=fp32", "compile=False", "enable_activation_offloading=False",
        "metric_logger._component_=torchtune.training.metric_logging.DiskLogger",
        "max_steps_per_epoch=2", f"output_dir={out}",
    ]  # fmt: skip
    assert _run_recipe("configs/llama3_2_3b_chat.yaml", overrides) == 0
    steps = {s: m for s, m in logged_metrics(out).items() if "loss" in m}
    assert sorted(steps) == [1, 2]
    assert f"Conversations rendered with the chat template in {TINY}/tokenizer_config.json" in caplog.text
    assert "dataset: 1000 samples" in caplog.text and "val_dataset: 100 samples" in caplog.text


def test_hub_loader_path_reads_a_dataset_folder(tmp_path):
    """A source that is not a file goes through datasets.load_dataset, as a Hub name does; offline, a local
    folder of data files takes that path."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_format(folder, "jsonl", [{"messages": m} for m in CONVERSATIONS[:5]])
    from_folder = conversation_dataset(_tokenizer(), str(folder), split="train", chat_template=str(TINY))
    from_file = conversation_dataset(_tokenizer(), str(folder / "data.jsonl"), chat_template=str(TINY))
    assert len(from_folder) == 5 and [from_folder[i] for i in range(5)] == [from_file[i] for i in range(5)]
