"""`make demo-tools`: the tiny model learns to answer a color question with a lookup_color call, then to answer from
the tool's result; lora_tools.generate asks with the schemas and prints the call it makes."""

import io
import json

from conftest import REPO, TINY, assert_scores_as_documented, latest_checkpoint, logged_metrics
from torchtune import config

from lora_tools import generate
from lora_tools.config.loader import load_config
from lora_tools.data import records
from lora_tools.data.chat_template import ChatFormat

CONFIG = "configs/tiny_tools.yaml"
HELDOUT = [json.loads(line) for line in (TINY / "data/tools_heldout.jsonl").read_text().splitlines()]
SCHEMAS = json.loads((TINY / "data/tools.json").read_text())


def _scores(out) -> dict[str, dict]:
    """eval.json's rows of the two tool tasks, by metric: "exact_match" (tiny_tool_call: the whole call) and
    "exact_match (called)" (tiny_tool_call_name: a lookup_color call, any arguments)."""
    report = json.loads((latest_checkpoint(out) / "eval.json").read_text())
    return {r["metric"]: r for r in report["rows"] if r["task"].startswith("tiny_tool_call")}


def test_the_tool_demo_learns_the_calls(tools_demo):
    """The held-out color questions, asked in wordings training never pairs with their thing: at most 10% of the
    base's answers are exact lookup_color calls, at least 80% of the trained model's are (the asked thing as the
    argument). Every trained answer is a call; docs/demo.md shows this run's table."""
    out, result, seconds = tools_demo
    rows = _scores(out)
    exact, called = rows["exact_match"], rows["exact_match (called)"]
    print(f"\ntool demo: calls {called['base']:.2f} -> {called['finetuned']:.2f}, exact calls {exact['base']:.2f} -> "
          f"{exact['finetuned']:.2f}; the command took {seconds:.0f} s")  # fmt: skip
    assert exact["base"] <= 0.10 and exact["finetuned"] >= 0.80, exact
    assert called["base"] <= 0.10 and called["finetuned"] == 1.0, called
    metrics = logged_metrics(out)
    assert metrics[max(metrics)]["val_loss"] < 0.05 * metrics[0]["val_loss"]
    doc = (REPO / "docs/demo.md").read_text()
    shown = doc[doc.index("<!-- tool demo numbers") :].split("```")[1]
    for task in ("tiny_tool_call", "tiny_tool_call_name"):
        assert_scores_as_documented(result.stdout, shown, task, len(HELDOUT))


def test_generate_with_tools_prints_the_call_and_answers_from_the_result(tools_demo, capsys, monkeypatch):
    """--tools FILE: the prompt is the schemas-carrying one the recipe trains on (ids as ChatFormat gives, which
    tests/test_tool_data.py checks against transformers); a call is printed as the structured call it is, and
    in interactive chat the result typed in gets an answer built from it."""
    out, _, _ = tools_demo
    question, call = HELDOUT[0]["question"], json.loads(HELDOUT[0]["call"])
    tools = str(TINY / "data/tools.json")
    args = ["--config", CONFIG, f"output_dir={out}", "--tools", tools, "--prompt", question, "--print-prompt-ids"]
    assert generate.main(args) == 0
    printed = capsys.readouterr().out
    (ids_line,) = [ln for ln in printed.splitlines() if ln.startswith("prompt ids:")]
    cfg = load_config(["--config", CONFIG])
    fmt = ChatFormat(config.instantiate(cfg.tokenizer), str(TINY))
    expected = fmt.prompt([{"role": "user", "content": question}], SCHEMAS)
    assert [int(t) for t in ids_line.split(":", 1)[1].split()] == expected
    assert 180 <= len(expected) <= 200  # docs/demo.md: about 190 tokens before and around the question
    (call_line,) = [ln for ln in printed.splitlines() if ln.startswith("tool call (not run):")]
    printed_call = json.loads(call_line.split(":", 1)[1])["tool_calls"][0]
    streamed = printed.split(call_line)[0].strip().splitlines()[-1]  # the answer as generated, before the call line
    generated = json.loads(streamed)
    assert printed_call == {
        "type": "function",
        "function": {"name": "lookup_color", "arguments": generated["parameters"]},
    }
    assert generated["name"] == call["name"] and set(generated["parameters"]) == set(call["parameters"])

    # interactive: the question, the call, then the tool's result typed in; the model answers in the demo's form
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{question}\nyellow\n"))
    assert generate.main(["--config", CONFIG, f"output_dir={out}"]) == 0
    chat = capsys.readouterr().out
    assert "tool call (not run):" in chat and "tool result> " in chat
    answer = chat.split("tool result> ", 1)[1].split("model> ", 1)[1].splitlines()[0]
    print(f"\n{question!r} -> call {printed_call['function']} -> result 'yellow' -> {answer!r}")
    assert answer.startswith("The ") and answer.endswith(".") and records.call_in_text(answer) is None
