"""The battery of bad inputs: each is one line on stderr, exit status 2, nothing written (times are printed).

Every case runs in-process through the entry point `tune run` calls (the recipe's ``main()`` with sys.argv set as
`tune run` sets it), or through wb.py's / lora_tools.download's ``main``. Three cases run through the real
`tune run` subprocess, imports included.

To add a case, append a ``Case`` to CASES: a name, the words its error line must hold, and what makes it bad
(overrides, a config file, environment variables, files to write, or a ``prepare`` hook for anything else,
such as a checkpoint to resume from). ``{tmp}`` in overrides, config, env values and file names is the case's
temporary folder; the run's output_dir is ``{tmp}/out``, and the case fails if the run changes anything there.
"""

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, TORCHAO_NOTICE, offline_env, tiny_vocab_size, tune

WANDB_LOGGER = "metric_logger._component_=torchtune.training.metric_logging.WandBLogger"
SHORT_WANDB_KEY = "abc123456789"  # 12 characters: W&B keys have 40 or more
CHAT = (
    "dataset._component_=torchtune.datasets.chat_dataset",
    "dataset.conversation_column=conversations",
    "dataset.data_files={tmp}/chat.json",
)
BROKEN_YAML = "output_dir: x\n\nmodel:\n  _component_: a\n  lora_rank: 8\n  lora_alpha: 16\n  lora_dropout 0\n"
NOT_UTF8 = b'[{"instruction": "caf\xe9", "input": "", "output": "b"}]\n'  # Latin-1, as some editors save
# Your own data (lora_tools.sft_data): configs/tiny_chat.yaml reading {tmp}/data.<suffix>
OWN = "configs/tiny_chat.yaml"
GOOD_CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
INSTRUCTIONS = (
    "dataset._component_=lora_tools.sft_data.instruction_dataset",
    "~dataset.conversation_column",
    "~dataset.train_on",
    "dataset.prompt_column=prompt",
    "dataset.completion_column=completion",
    "dataset.input_column=null",
    "dataset.source={tmp}/data.jsonl",
)


def _chat_rows(*rows: str, good_before: int = 0) -> str:
    return "\n".join([GOOD_CHAT] * good_before + list(rows)) + "\n"


def _call(arguments) -> dict:
    """A lookup_color call in OpenAI's form, its arguments as given (an object, or JSON text)."""
    return {"type": "function", "function": {"name": "lookup_color", "arguments": arguments}}


def _tool_row(*calls: dict) -> str:
    """A conversation whose assistant makes ``calls``, then gets a result and answers."""
    messages = [
        {"role": "user", "content": "What color is the plum?"},
        {"role": "assistant", "content": None, "tool_calls": list(calls)},
        {"role": "tool", "content": "purple"},
        {"role": "assistant", "content": "Purple."},
    ]
    return json.dumps({"messages": messages})


# Preference pairs: configs/tiny_dpo.yaml on the tiny base (its demo base, a chat run's output, is not there in
# tests), reading {tmp}/pairs.jsonl
DPO_CFG = "configs/tiny_dpo.yaml"
ON_TINY = ("checkpointer.checkpoint_dir=assets/tiny",)
PAIRS = (*ON_TINY, "dataset.source={tmp}/pairs.jsonl")
GOOD_PAIR = '{"prompt": "What color is the lemon?", "chosen": "Yellow.", "rejected": "Blue."}'
OBJECTIVES = "lora_tools.train.objectives"


def _pair_rows(*rows: str, good_before: int = 1) -> str:
    return "\n".join([GOOD_PAIR] * good_before + list(rows)) + "\n"


def _two_pair_files() -> str:
    """configs/tiny_dpo.yaml on the tiny base with a list of two preference datasets as its training data."""
    text = (REPO / DPO_CFG).read_text().replace("outputs/tiny_chat/checkpoints/step_0000120/model", "assets/tiny")
    builder = "_component_: lora_tools.data.preference.preference_dataset\n"
    first = f"- {builder}  source: assets/tiny/data/pairs_heldout.jsonl\n  chat_template: assets/tiny\n"
    assert text.count(f"\ndataset:\n  {builder}") == 1
    return text.replace(f"\ndataset:\n  {builder}", f"\ndataset:\n{first}- {builder}")


def _two_chats(first: str, second: str) -> str:
    """An override: configs/tiny_chat.yaml's training data as a list of two conversation sections, each with the
    keys given (YAML flow syntax, each starting with ", ")."""
    section = "{_component_: lora_tools.data.sft.conversation_dataset, source: assets/tiny/data/chat_train.jsonl%s}"
    return f"dataset=[{section % first}, {section % second}]"


def _write_parquet(tmp: Path, monkeypatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"conversation": [[{"role": "user", "content": "hi"}]]}), tmp / "data.parquet")


# The shipped 3B config with only the tiny checkpoint, tokenizer, data and CPU settings: its model builder stays 3B.
SHIPPED_3B_ON_TINY = (
    "checkpointer.checkpoint_dir=assets/tiny",
    "checkpointer.checkpoint_files=[model.safetensors]",
    "tokenizer.path=assets/tiny/original/tokenizer.model",
    "tokenizer.special_tokens_path=assets/tiny/special_tokens.json",
    "dataset.source=json",
    "dataset.data_files=assets/tiny/data/train.json",
    "val_dataset=null",
    "device=cpu",
    "dtype=fp32",
    "compile=False",
    "enable_activation_offloading=False",
    "metric_logger._component_=torchtune.training.metric_logging.DiskLogger",
)


def train_one_step(out: Path) -> None:
    """A real checkpoint to resume from: the tiny config (its datasets too, so their cache is made as a first run
    makes it), one step, rank 16, in-process."""
    from conftest import tiny_cfg

    from lora_finetune_single_device import LoRAFinetuneRecipe
    from lora_tools.config import settings

    cfg = tiny_cfg(output_dir=str(out), max_steps_per_epoch=1, sample_prompts="[]")
    recipe = LoRAFinetuneRecipe(cfg, settings.parse(cfg, "test config"))
    recipe.setup()
    recipe.train()
    recipe.finish()
    recipe.cleanup()


@dataclass(frozen=True)
class Case:
    name: str
    expect: tuple[str, ...]  # words the one error line must hold
    overrides: tuple[str, ...] = ()
    config: str = "configs/tiny.yaml"
    env: dict = field(default_factory=dict)  # None unsets a variable
    files: dict = field(default_factory=dict)  # path under {tmp} -> text or bytes
    entry: str = "recipe"  # "recipe" (tune run), "wb" (python wb.py) or "download" (python -m lora_tools.download)
    in_tmp: bool = False  # run from {tmp}, a checkout of links (configs, assets), so a .env written there is read
    secrets: tuple[str, ...] = ()  # must appear nowhere in the output
    prepare: Callable | None = None  # prepare(tmp: Path, monkeypatch) before the run
    absent: tuple[str, ...] = ()  # words the error line must not hold (a hint that does not fit)
    status: int = 2


CASES = [
    # --- unknown keys, at every depth --------------------------------------------------------------------------
    Case("unknown-top-level-key", ("override foo=1: unknown key 'foo'", "remove it"), ("foo=1",), absent=("yaml",)),
    Case("override-bad-value", ("override batch_size=0: batch_size is 0",), ("batch_size=0",)),
    Case(
        "required-key-typo-in-the-yaml-file",
        ("typo.yaml: unknown key 'batchsize'", "did you mean 'batch_size'?"),
        config="{tmp}/typo.yaml",
        files={"typo.yaml": (REPO / "configs/tiny.yaml").read_text().replace("batch_size:", "batchsize:")},
    ),
    Case("batchsize", ("unknown key 'batchsize'", "did you mean 'batch_size'?"), ("batchsize=4",)),
    Case("early-stoping", ("did you mean 'early_stopping_patience'?",), ("early_stoping_patience=2",)),
    Case("model-lora-rnak", ("'model.lora_rnak'", "did you mean 'model.lora_rank'?"), ("model.lora_rnak=8",)),
    Case("optimizer-learning-rate", ("'optimizer.learning_rate'", "'optimizer.lr'"), ("optimizer.learning_rate=1",)),
    Case("dataset-trian-on-input", ("did you mean 'dataset.train_on_input'?",), ("dataset.trian_on_input=True",)),
    Case("checkpoint-fils", ("did you mean 'checkpointer.checkpoint_files'?",), ("checkpointer.checkpoint_fils=[a]",)),
    Case("load-dataset-kwarg", ("did you mean 'dataset.streaming'?",), ("dataset.streamin=True",)),
    Case(
        "typo-in-the-yaml-file",
        ("typo.yaml", "unknown key 'model.lora_rnak'", "did you mean 'model.lora_rank'?"),
        config="{tmp}/typo.yaml",
        files={"typo.yaml": (REPO / "configs/tiny.yaml").read_text().replace("lora_rank: 16", "lora_rnak: 16")},
    ),
    # --- wrong types and impossible values ---------------------------------------------------------------------
    Case("batch-size-0", ("batch_size is 0", "greater than 0"), ("batch_size=0",)),
    Case("batch-size-negative", ("batch_size is -1", "greater than 0"), ("batch_size=-1",)),
    Case("grad-accumulation-0", ("gradient_accumulation_steps is 0",), ("gradient_accumulation_steps=0",)),
    Case("max-steps-0", ("max_steps_per_epoch is 0",), ("max_steps_per_epoch=0",)),
    Case("epochs-0", ("epochs is 0",), ("epochs=0",)),
    Case("lora-rank-0", ("model.lora_rank is 0", "greater than 0"), ("model.lora_rank=0",)),
    Case("lora-rank-float", ("model.lora_rank is 2.5", "an integer"), ("model.lora_rank=2.5",)),
    Case("lora-dropout-1", ("model.lora_dropout is 1",), ("model.lora_dropout=1",)),
    Case("lr-abc", ("optimizer.lr is 'abc'", "torch.optim.AdamW takes a number"), ("optimizer.lr=abc",)),
    Case("lr-negative", ("optimizer.lr is -1", ">= 0"), ("optimizer.lr=-1",)),
    Case("max-seq-len-0", ("tokenizer.max_seq_len is 0",), ("tokenizer.max_seq_len=0",)),
    Case("dtype-fp16", ("use dtype=bf16 (GPU) or dtype=fp32 (CPU)",), ("dtype=fp16",)),
    Case("compile-maybe", ("compile is 'maybe'", "True or False"), ("compile=maybe",)),
    Case("compile-yes", ("compile is 'yes'", "True or False"), ("compile=yes",)),
    Case("sample-prompts-5", ("sample_prompts is 5", "a list"), ("sample_prompts=5",)),
    Case("eval-task-typo", ("unknown evaluation task 'tiny_q'", "did you mean tiny_qa"), ("eval_tasks=[tiny_q]",)),
    Case("eval-limit-0", ("eval_limit is 0", "greater than 0"), ("eval_tasks=[tiny_qa]", "eval_limit=0")),
    Case("device-typo", ("device 'cuad'", "cuda, cuda:N or cpu"), ("device=cuad",)),
    Case(
        "scheduler-steps-given", ("lr_scheduler.num_training_steps", "recipe"), ("lr_scheduler.num_training_steps=9",)
    ),
    # --- component names ---------------------------------------------------------------------------------------
    Case(
        "model-component-typo",
        ("model._component_", "did you mean torchtune.models.llama3_2.lora_llama3_2_3b?"),
        ("model._component_=torchtune.models.llama3_2.lora_llama3_2_3bb",),
    ),
    Case(
        "optimizer-AdamWW",
        ("optimizer._component_", "did you mean torch.optim.AdamW?"),
        ("optimizer=torch.optim.AdamWW",),
    ),
    Case(
        "loss-missing-module",
        ("loss._component_", "torchtune.modules has no losss", "torchtune.modules.loss.CEWithChunkedOutputLoss"),
        ("loss._component_=torchtune.modules.losss.CEWithChunkedOutputLoss",),
    ),
    Case(
        "collate-fn-typo",
        ("did you mean torchtune.data.padded_collate_sft?",),
        ("collate_fn=torchtune.data.padded_collate_sftt",),
    ),
    # --- missing pieces, broken syntax -------------------------------------------------------------------------
    Case(
        "missing-component-argument",
        ("checkpointer is missing 'checkpoint_dir'", "FullModelHFCheckpointer"),
        ("~checkpointer.checkpoint_dir",),
    ),
    Case("missing-required-key", ("required key 'batch_size' is missing",), ("~batch_size",)),
    Case(
        "yaml-syntax-error",
        ("broken.yaml line 7, column 3: could not find expected ':'", "fix the YAML at that place"),
        config="{tmp}/broken.yaml",
        files={"broken.yaml": BROKEN_YAML},
    ),
    Case(
        "broken-interpolation",
        ("checkpointer.output_dir", "output_dirr", "cannot be resolved"),
        ("checkpointer.output_dir=${output_dirr}",),
    ),
    Case("override-without-value", ("'batch_size' is not key=value",), ("batch_size",)),
    Case("missing-config-file", ("config file not found", "nope.yaml"), config="{tmp}/nope.yaml"),
    # --- data files --------------------------------------------------------------------------------------------
    Case(
        "empty-dataset-file",
        ("empty.json", "is empty"),
        ("dataset.data_files={tmp}/empty.json",),
        files={"empty.json": ""},
    ),
    Case(
        "dataset-with-no-rows",
        ("none.json", "no rows"),
        ("dataset.data_files={tmp}/none.json",),
        files={"none.json": "[]"},
    ),
    Case(
        "dataset-not-utf8",
        ("latin1.json", "not UTF-8", f"byte {NOT_UTF8.index(0xE9)}"),
        ("dataset.data_files={tmp}/latin1.json",),
        files={"latin1.json": NOT_UTF8},
    ),
    Case(
        "chat-missing-column",
        ("chat.json, row 2", "'conversations'", "dataset.conversation_column"),
        (*CHAT, "dataset.conversation_style=sharegpt"),
        files={"chat.json": '[{"conversations": [{"from": "human", "value": "hi"}]}, {"convo": []}]'},
    ),
    Case(
        "chat-not-a-list",
        ("chat.json, row 1", "not a list of messages"),
        (*CHAT, "dataset.conversation_style=sharegpt"),
        files={"chat.json": '[{"conversations": "hello"}]'},
    ),
    Case(
        "chat-sharegpt-missing-value",
        ("row 1, message 2", "no 'value'", "sharegpt"),
        (*CHAT, "dataset.conversation_style=sharegpt"),
        files={"chat.json": '[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}]'},
    ),
    Case(
        "chat-openai-missing-role",
        ("row 1, message 1", "no 'role'", "openai"),
        (*CHAT, "dataset.conversation_style=openai"),
        files={"chat.json": '[{"conversations": [{"from": "user", "content": "hi"}]}]'},
    ),
    Case(
        "chat-unknown-role",
        ("row 1, message 2", "unknown role 'bot'", "system, user, assistant"),
        (*CHAT, "dataset.conversation_style=openai"),
        files={"chat.json": '[{"conversations": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}]'},
    ),
    # --- your own data: conversations and instructions (lora_tools.sft_data) ----------------------------------
    Case(
        "own-file-missing",
        ("dataset file", "nope.jsonl does not exist", "dataset.source"),
        ("dataset.source={tmp}/nope.jsonl",),
        config=OWN,
    ),
    Case(
        "own-empty-file",
        ("data.jsonl is empty", "add samples"),
        ("dataset.source={tmp}/data.jsonl",),
        config=OWN,
        files={"data.jsonl": ""},
    ),
    Case(
        "own-bad-json-row-7",
        ("data.jsonl is not valid JSON (line 7", "one JSON object"),
        ("dataset.source={tmp}/data.jsonl",),
        config=OWN,
        files={"data.jsonl": _chat_rows('{"messages": [{"role": "user", "content": "hi"}', good_before=6)},
    ),
    Case(
        "own-json-array-syntax",
        ("data.json is not valid JSON (line 3, column 3: Expecting ',' delimiter)",),
        ("dataset.source={tmp}/data.json",),
        config=OWN,
        files={"data.json": "[\n  " + GOOD_CHAT + "\n  " + GOOD_CHAT + "\n]\n"},
    ),
    Case(
        "own-row-not-an-object",
        ("data.jsonl, row 2: a row must be an object",),
        ("dataset.source={tmp}/data.jsonl",),
        config=OWN,
        files={"data.jsonl": _chat_rows("[1, 2]", good_before=1)},
    ),
    Case(
        "own-missing-column",
        ("row 1: no 'messages' column", "the row has: conversations", "dataset.conversation_column"),
        ("dataset.source={tmp}/data.jsonl",),
        config=OWN,
        files={"data.jsonl": _chat_rows('{"conversations": [{"from": "human", "value": "hi"}]}')},
    ),
    Case(
        "own-unknown-role",
        ("row 3, message 2", "unknown role 'robot'", "system, user, assistant or tool"),
        ("dataset.source={tmp}/data.jsonl",),
        config=OWN,
        files={
            "data.jsonl": _chat_rows(
                '{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}', good_before=2
            )
        },
    ),
    Case(
        "own-no-assistant-turn",
        ("row 1: the conversation has no assistant turn",),
        ("dataset.source={tmp}/data.jsonl",),
        config=OWN,
        files={
            "data.jsonl": _chat_rows(
                '{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "a"}]}'
            )
        },
    ),
    Case(
        "own-empty-messages",
        ("row 2: the conversation is empty",),
        ("dataset.source={tmp}/data.jsonl",),
        config=OWN,
        files={"data.jsonl": _chat_rows('{"messages": []}', good_before=1)},
    ),
    Case(
        "own-content-not-text",
        ("row 1, message 2: content is int, not text",),
        ("dataset.source={tmp}/data.jsonl",),
        config=OWN,
        files={
            "data.jsonl": _chat_rows(
                '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]}'
            )
        },
    ),
    Case(
        "own-sharegpt-wrong-keys",
        ("row 1, message 1: keys speaker, text", "from and value (ShareGPT)"),
        ("dataset.source={tmp}/data.jsonl", "dataset.conversation_column=conversations"),
        config=OWN,
        files={"data.jsonl": _chat_rows('{"conversations": [{"speaker": "human", "text": "a"}]}')},
    ),
    Case(
        "own-csv-cell-not-json",
        ("data.csv, row 2: column 'messages' is not JSON",),
        ("dataset.source={tmp}/data.csv",),
        config=OWN,
        files={
            "data.csv": 'messages\n"[{""role"": ""user"", ""content"": ""a""}, {""role"": ""assistant"", '
            '""content"": ""b""}]"\nhello there\n'
        },
    ),
    Case(
        "own-parquet-missing-column",
        ("data.parquet, row 1: no 'messages' column", "the row has: conversation"),
        ("dataset.source={tmp}/data.parquet",),
        config=OWN,
        prepare=_write_parquet,
    ),
    Case(
        "own-unknown-file-type",
        ("data.txt: unknown type '.txt'", ".jsonl, .csv or .parquet"),
        ("dataset.source={tmp}/data.txt",),
        config=OWN,
        files={"data.txt": "hello\n"},
    ),
    Case(
        "own-train-on-typo",
        ("dataset.train_on is 'assistants'", "assistant, last, all"),
        ("dataset.train_on=assistants",),
        config=OWN,
    ),
    Case(
        "own-chat-template-missing",
        ("chat_template", "nowhere.json does not exist", "base model's folder"),
        ("dataset.chat_template={tmp}/nowhere.json",),
        config=OWN,
    ),
    Case(
        "own-chat-template-folder-without-tokenizer-config",
        ("chat_template", "has no tokenizer_config.json", "chat_template: null"),
        ("dataset.chat_template={tmp}",),
        config=OWN,
    ),
    Case(
        "own-split-on-a-local-file",
        ("dataset.split is 'train[:98%]'", "only applies to Hub datasets", "a file of their own"),
        ("dataset.split=train[:98%]",),
        config=OWN,
    ),
    Case(
        "own-role-not-text",
        ("row 1, message 1: unknown role",),
        ("dataset.source={tmp}/data.jsonl",),
        config=OWN,
        files={"data.jsonl": _chat_rows('{"messages": [{"role": ["user"], "content": "a"}]}')},
    ),
    Case(
        "own-instruction-missing-column",
        ("row 2: no 'completion' column", "the row has: prompt, answer", "completion_column"),
        INSTRUCTIONS,
        config=OWN,
        files={"data.jsonl": '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "answer": "b"}\n'},
    ),
    Case(
        "own-instruction-empty-completion",
        ("row 1: column 'completion' is empty", "nothing to learn"),
        INSTRUCTIONS,
        config=OWN,
        files={"data.jsonl": '{"prompt": "a", "completion": "  "}\n'},
    ),
    Case(
        "own-val-dataset-row",
        ("held.jsonl, row 1, message 1: unknown role 'narrator'",),
        ("val_dataset.source={tmp}/held.jsonl",),
        config=OWN,
        files={"held.jsonl": _chat_rows('{"messages": [{"role": "narrator", "content": "a"}]}')},
    ),
    # --- tool calls and message parts (lora_tools.data.records) ------------------------------------------------
    Case(
        "tool-call-without-a-name",
        ("data.jsonl, row 2, message 2, tool call 1: the call has no function name", '"function": {"name"'),
        ("dataset.source={tmp}/data.jsonl",),
        config=OWN,
        files={"data.jsonl": _chat_rows(_tool_row({"function": {"arguments": {"thing": "plum"}}}), good_before=1)},
    ),
    Case(
        "tool-arguments-not-json",
        ("row 1, message 2, tool call 1: the arguments of lookup_color is not valid JSON", "write it as a JSON object"),
        ("dataset.source={tmp}/data.jsonl",),
        config=OWN,
        files={"data.jsonl": _chat_rows(_tool_row(_call("{thing: plum")))},
    ),
    Case(
        "tool-arguments-a-list",
        ("row 1, message 2, tool call 1: the arguments of lookup_color are list, not an object",),
        ("dataset.source={tmp}/data.jsonl",),
        config=OWN,
        files={"data.jsonl": _chat_rows(_tool_row(_call("[1, 2]")))},
    ),
    Case(
        "tool-result-before-any-call",
        ("row 1, message 2: a tool result with no tool call before it", "put the assistant message"),
        ("dataset.source={tmp}/data.jsonl",),
        config=OWN,
        files={
            "data.jsonl": _chat_rows(
                '{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "red"}, '
                '{"role": "assistant", "content": "b"}]}'
            )
        },
    ),
    Case(
        "tools-column-not-a-list",
        ("row 1: column 'tools' holds dict, not a list of tool schemas", "give a JSON list"),
        ("dataset.source={tmp}/data.jsonl",),
        config=OWN,
        files={"data.jsonl": _chat_rows(GOOD_CHAT[:-1] + ', "tools": {"name": "f"}}')},
    ),
    Case(
        "tools-file-missing",
        ("dataset.tools: ", "nope.json does not exist", "a list of tool schemas"),
        ("dataset.tools={tmp}/nope.json",),
        config=OWN,
    ),
    Case(
        "tool-schema-without-a-name",
        ("dataset.tools: file ", "has a tool schema without a function name"),
        ("dataset.tools={tmp}/tools.json",),
        config=OWN,
        files={"tools.json": '[{"type": "function", "function": {"parameters": {}}}]'},
    ),
    Case(
        "two-parallel-calls-under-llama-3-2",
        ("row 1: the chat template in", "refused the conversation: This model only supports single tool-calls"),
        ("dataset.source={tmp}/data.jsonl",),
        config=OWN,
        files={"data.jsonl": _chat_rows(_tool_row(_call({"thing": "plum"}), _call({"thing": "kiwi"})))},
    ),
    Case(
        "image-part",
        ("row 1, message 1: a part of type 'image_url'", "this recipe trains text models"),
        ("dataset.source={tmp}/data.jsonl",),
        config=OWN,
        files={
            "data.jsonl": _chat_rows(
                '{"messages": [{"role": "user", "content": [{"type": "text", "text": "what is it?"}, {"type": '
                '"image_url", "image_url": {"url": "cat.png"}}]}, {"role": "assistant", "content": "a cat"}]}'
            )
        },
    ),
    Case(
        "sharegpt-function-call-not-json",
        ("row 1, message 2: the function_call turn is not valid JSON",),
        ("dataset.source={tmp}/data.jsonl", "dataset.conversation_column=conversations"),
        config=OWN,
        files={
            "data.jsonl": '{"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": '
            '"lookup_color(plum)"}, {"from": "gpt", "value": "b"}]}\n'
        },
    ),
    Case(
        "tool-call-on-a-user-message",
        ("row 1, message 1: a user message has tool calls; only assistant messages make calls",),
        ("dataset.source={tmp}/data.jsonl",),
        config=OWN,
        files={
            "data.jsonl": _chat_rows(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": "a", "tool_calls": [_call({"thing": "plum"})]},
                            {"role": "assistant", "content": "b"},
                        ]
                    }
                )
            )
        },
    ),
    # --- preference pairs (lora_tools.data.preference) and their objectives (DPO, ORPO) --------------------------
    Case(
        "pairs-missing-chosen",
        ("pairs.jsonl, row 2: no 'chosen' column", "the row has: prompt, answer, rejected", "dataset.chosen_column"),
        PAIRS,
        config=DPO_CFG,
        files={"pairs.jsonl": _pair_rows('{"prompt": "q", "answer": "a", "rejected": "b"}')},
    ),
    Case(
        "pairs-missing-rejected",
        ("pairs.jsonl, row 3: no 'rejected' column", "the row has: prompt, chosen", "dataset.rejected_column"),
        PAIRS,
        config=DPO_CFG,
        files={"pairs.jsonl": _pair_rows('{"prompt": "q", "chosen": "a", "rejected": null}', good_before=2)},
    ),
    Case(
        "pairs-hh-no-common-prefix",
        ("pairs.jsonl, row 2: chosen and rejected share no first message", "the same up to the response"),
        PAIRS,
        config=DPO_CFG,
        files={
            "pairs.jsonl": _pair_rows(
                '{"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello.", '
                '"rejected": "\\n\\nHuman: Hey\\n\\nAssistant: Go away."}'
            )
        },
    ),
    Case(
        "pairs-empty-chosen",
        ("pairs.jsonl, row 2: the chosen response is empty", "write it or remove the row"),
        PAIRS,
        config=DPO_CFG,
        files={"pairs.jsonl": _pair_rows('{"prompt": "q", "chosen": " ", "rejected": "b"}')},
    ),
    Case(
        "pairs-response-longer-than-max-seq-len",
        (
            "pairs.jsonl, row 2: the rejected response is",
            "no room for the prompt within tokenizer.max_seq_len 16",
            "raise tokenizer.max_seq_len",
        ),
        (*PAIRS, "tokenizer.max_seq_len=16"),
        config=DPO_CFG,
        files={"pairs.jsonl": _pair_rows('{"prompt": "q", "chosen": "a", "rejected": "%s"}' % ("word " * 40))},
    ),
    Case(
        "pairs-unknown-role",
        ("pairs.jsonl, row 2, column 'prompt', message 2: unknown role 'robot'", "use system, user, assistant or tool"),
        PAIRS,
        config=DPO_CFG,
        files={
            "pairs.jsonl": _pair_rows(
                '{"prompt": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}, '
                '{"role": "user", "content": "c"}], "chosen": "x", "rejected": "y"}'
            )
        },
    ),
    Case(
        "pairs-packed",
        ("dataset.packed", "preference pairs are not packed"),
        (*ON_TINY, "dataset.packed=True"),
        config=DPO_CFG,
    ),
    Case(
        "pairs-without-objective",
        ("dataset gives preference pairs but no objective is set", f"objective._component_={OBJECTIVES}.DPO"),
        (*ON_TINY, "~objective"),
        config=DPO_CFG,
    ),
    Case(
        "pairs-objective-null",
        ("dataset gives preference pairs but no objective is set",),
        (*ON_TINY, "objective=null"),
        config=DPO_CFG,
    ),
    Case(
        "objective-dpo-on-sft-data",  # conversations (lora_tools' own reader: no progress bars of `datasets`)
        ("dataset: DPO trains on preference pairs", "single sequences", "preference_dataset (prompt, chosen"),
        (f"objective._component_={OBJECTIVES}.DPO",),
        config=OWN,
    ),
    Case(
        "objective-unknown",
        (
            f"override objective._component_={OBJECTIVES}.KTO: objective._component_ {OBJECTIVES}.KTO does not exist",
            f"objectives has no KTO; use {OBJECTIVES}.DPO or {OBJECTIVES}.ORPO (or objective=null for SFT)",
        ),
        (*ON_TINY, f"objective._component_={OBJECTIVES}.KTO"),
        config=DPO_CFG,
    ),
    Case(
        "objective-typo",
        (f"did you mean {OBJECTIVES}.ORPO?",),
        (*ON_TINY, f"objective._component_={OBJECTIVES}.OPRO"),
        config=DPO_CFG,
        absent=("use lora_tools",),
    ),
    Case(
        "objective-beta-0",
        ("objective.beta is 0", "greater than 0"),
        (*ON_TINY, "objective.beta=0"),
        config=DPO_CFG,
    ),
    Case(
        "objective-beta-negative",
        ("objective.beta is -1", "greater than 0"),
        (*ON_TINY, "objective.beta=-1"),
        config=DPO_CFG,
    ),
    Case(
        "objective-label-smoothing-half",
        ("objective.label_smoothing is 0.5", "from 0 up to 0.5"),
        (*ON_TINY, "objective.label_smoothing=0.5"),
        config=DPO_CFG,
    ),
    Case(
        "objective-orpo-with-dpo-options",
        (
            "tiny_dpo.yaml: unknown keys 'objective.label_smoothing', 'objective.precompute_reference' and "
            f"'objective.sft_weight': {OBJECTIVES}.ORPO takes no such arguments (it takes beta, nll_on_prompt); "
            "remove them",
        ),
        (*ON_TINY, f"objective._component_={OBJECTIVES}.ORPO"),
        config=DPO_CFG,
    ),
    Case(
        "objective-orpo-precompute-reference",
        (
            "override objective.precompute_reference=True: unknown key 'objective.precompute_reference': "
            f"{OBJECTIVES}.ORPO takes no such argument (it takes beta, nll_on_prompt); remove it",
        ),
        (
            *ON_TINY,
            f"objective._component_={OBJECTIVES}.ORPO",
            "~objective.label_smoothing",
            "~objective.sft_weight",
            "objective.precompute_reference=True",
        ),
        config=DPO_CFG,
    ),
    Case(
        "objective-sft-weight-negative",
        ("objective.sft_weight is -1", "a number >= 0"),
        (*ON_TINY, "objective.sft_weight=-1"),
        config=DPO_CFG,
    ),
    Case(
        "objective-dpo-on-sft-val-dataset",  # pairs to train on, conversations held out
        ("val_dataset: DPO trains on preference pairs", "val_dataset gives single sequences"),
        (
            *ON_TINY,
            "val_dataset._component_=lora_tools.data.sft.conversation_dataset",
            "val_dataset.source=assets/tiny/data/chat_heldout.jsonl",
        ),
        config=DPO_CFG,
    ),
    Case(
        "start-adapter-missing",
        ("/nowhere is neither a checkpoint folder", "a finished run's output_dir"),
        (*ON_TINY, "start_adapter={tmp}/nowhere", "objective.precompute_reference=True"),
        config=DPO_CFG,
    ),
    Case(
        "start-adapter-dpo-without-precompute",
        ("start_adapter with DPO needs objective.precompute_reference=True", "the bare base"),
        (*ON_TINY, "start_adapter={tmp}/nowhere"),
        config=DPO_CFG,
    ),
    Case(
        "pairs-in-a-list",
        ("dataset: a preference dataset must be the only one in its section",),
        config="{tmp}/two.yaml",
        files={"two.yaml": _two_pair_files()},
    ),
    # --- weighted dataset lists (lora_tools.data.mixing) -------------------------------------------------------
    Case("mix-weight-0", ("override dataset.weight=0: dataset.weight is 0", "greater than 0"), ("dataset.weight=0",)),
    Case("mix-weight-negative", ("dataset.weight is -1", "a number greater than 0"), ("dataset.weight=-1",)),
    Case("mix-weight-abc", ("dataset.weight is 'abc'", "a number greater than 0"), ("dataset.weight=abc",)),
    Case(
        "mix-max-samples-0",
        ("dataset[1].max_samples is 0", "an integer >= 1", "fix dataset[1].max_samples"),
        (_two_chats("", ", max_samples: 0"),),
        config=OWN,
    ),
    Case(
        "mix-weight-on-one-section-only",
        ("override dataset=[", "dataset[1] has no weight but dataset[0] has one; give every section a weight, or none"),
        (_two_chats(", weight: 2", ""),),
        config=OWN,
    ),
    Case(
        "mix-max-samples-on-pairs",
        ("dataset.max_samples: preference pairs are read whole; remove dataset.max_samples",),
        (*ON_TINY, "dataset.max_samples=100"),
        config=DPO_CFG,
    ),
    Case(
        "mix-weight-on-pairs",
        ("dataset.weight: preference pairs are read whole; remove dataset.weight",),
        (*ON_TINY, "dataset.weight=1"),
        config=DPO_CFG,
    ),
    # --- .env and W&B ------------------------------------------------------------------------------------------
    Case(
        "dotenv-malformed",
        (".env line 2 is not KEY=value", "fix or remove that line"),
        in_tmp=True,
        files={".env": "HF_TOKEN=hf_fake\nWANDB_API_KEY f4kesecretvalue\n"},
        secrets=("f4kesecretvalue",),
    ),
    Case(
        "dotenv-malformed-wb",
        (".env line 3 is not KEY=value", "a quote that is not closed"),
        entry="wb",
        in_tmp=True,
        files={".env": 'A=1\n\nWANDB_API_KEY="f4kesecretvalue\n'},
        secrets=("f4kesecretvalue",),
    ),
    Case(
        "dotenv-malformed-download",
        (".env line 1 is not KEY=value",),
        entry="download",
        in_tmp=True,
        files={".env": "HF_TOKEN hf_f4kesecretvalue\n"},
        secrets=("hf_f4kesecretvalue",),
    ),
    Case(
        "wandb-key-wrong-shape",
        ("WANDB_API_KEY in .env has the wrong shape", "has 12", "https://wandb.ai/authorize"),
        (WANDB_LOGGER,),
        env={"WANDB_MODE": None, "WANDB_API_KEY": None},
        in_tmp=True,
        files={".env": f"WANDB_API_KEY={SHORT_WANDB_KEY}\n"},
        secrets=(SHORT_WANDB_KEY,),
    ),
    Case(
        "wandb-key-wrong-shape-wb",
        ("WANDB_API_KEY in .env has the wrong shape", "has 12", "https://wandb.ai/authorize"),
        entry="wb",
        env={"WANDB_MODE": None, "WANDB_API_KEY": None},
        in_tmp=True,
        files={".env": f"WANDB_API_KEY={SHORT_WANDB_KEY}\n"},
        secrets=(SHORT_WANDB_KEY,),
    ),
    Case(
        "wandb-without-key",
        ("WANDB_API_KEY", "python wb.py", "WANDB_MODE=offline"),
        (WANDB_LOGGER,),
        env={"WANDB_MODE": None, "WANDB_API_KEY": None},
    ),
    # --- the preflight checks that were there before -----------------------------------------------------------
    Case(
        "3b-checkpoint-missing",
        ("python -m lora_tools.download meta-llama/Llama-3.2-3B-Instruct --output-dir ckpts/Llama-3.2-3B-Instruct",),
        (
            "device=cpu",
            "dtype=fp32",
            "compile=False",
            "enable_activation_offloading=False",
            "metric_logger._component_=torchtune.training.metric_logging.DiskLogger",
        ),
        config="lora_finetune_single_device.yaml",
    ),
    Case(
        "checkpoint-file-missing",
        ("missing.safetensors", "tiny_assets"),
        ("checkpointer.checkpoint_files=[missing.safetensors]",),
    ),
    Case(
        "tokenizer-missing", ("tokenizer.path", "missing.model"), ("tokenizer.path=assets/tiny/original/missing.model",)
    ),
    Case("cuda-without-gpu", ("no CUDA GPU", "device=cpu"), ("device=cuda",)),
    Case("offloading-on-cpu", ("enable_activation_offloading", "CUDA"), ("enable_activation_offloading=True",)),
    Case(
        "dataset-file-missing", ("absent.json", "does not exist"), ("dataset.data_files=assets/tiny/data/absent.json",)
    ),
    Case(
        "dataset-not-json",
        ("bad.json", "not valid JSON"),
        ("dataset.data_files={tmp}/bad.json",),
        files={"bad.json": '[{"instruction": "a", "input": "", "output": "b"},\n{not json\n'},
    ),
    Case(
        "dataset-row-missing-field",
        ("rows.json, row 2", "'output'"),
        ("dataset.data_files={tmp}/rows.json",),
        files={"rows.json": '[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": ""}]'},
    ),
    Case("output-dir-is-a-file", ("output_dir", "is a file"), ("output_dir={tmp}/a_file/out",), files={"a_file": ""}),
    Case("compile-without-compiler", ("compile", "C++ compiler"), ("compile=True",), env={"PATH": "{tmp}/empty-bin"}),
    Case(
        "component-key-misspelt-in-optional-section",  # must not switch validation off silently
        ("val_dataset has '_componet_' but no _component_", "val_dataset=null"),
        config="{tmp}/typo.yaml",
        files={
            "typo.yaml": (REPO / "configs/tiny.yaml")
            .read_text()
            .replace(
                "  _component_: torchtune.datasets.alpaca_dataset\n  source: json\n  data_files: assets/tiny/data/h",
                "  _componet_: torchtune.datasets.alpaca_dataset\n  source: json\n  data_files: assets/tiny/data/h",
            )
        },
    ),
    Case("disk-logger-key-typo", ("did you mean 'metric_logger.filename'?",), ("metric_logger.filenme=a.txt",)),
    Case(
        "wandb-logger-key-typo",
        ("did you mean 'metric_logger.project'?",),
        (WANDB_LOGGER, "metric_logger.projet=x"),
    ),
    # --- what a new user hits on a fresh clone ------------------------------------------------------------------
    Case(
        "json-source-without-data-files",  # datasets would glob every JSON file under the working directory
        ("dataset.source is json but dataset.data_files is not set", "set dataset.data_files="),
        ("dataset.data_files=null",),
    ),
    Case(
        "source-folder-with-only-a-readme",
        ("/data is a folder without data files", "it holds only README.txt", "one file"),
        ("dataset.source={tmp}/data",),
        config=OWN,
        files={"data/README.txt": "my chats, to be exported\n"},
    ),
    Case(
        "source-folder-empty",
        ("/data is a folder without data files", "it is empty"),
        ("dataset.source={tmp}/data",),
        config=OWN,
        prepare=lambda tmp, monkeypatch: (tmp / "data").mkdir(),
    ),
    Case(
        "no-trained-token-left",  # every answer cut off: refused before any weights load
        ("no sample of dataset keeps a token to train on", "cut at tokenizer.max_seq_len=8", "raise tokenizer"),
        ("tokenizer.max_seq_len=8",),
        config=OWN,
    ),
    Case(
        "tokenizer-missing-outside-the-demo-folder",
        ("/mine/tokenizer.model is missing", "check the path"),
        ("tokenizer.path={tmp}/mine/tokenizer.model",),
        absent=("tiny_assets", "meta-llama/mine"),
    ),
    Case(
        "checkpoint-dir-wrong",
        ("checkpointer.checkpoint_dir ckpts/nope does not exist", "check the path"),
        ("checkpointer.checkpoint_dir=ckpts/nope",),
        absent=("tiny_assets", "meta-llama/nope"),
    ),
    Case(
        "demo-checkpoint-file-missing",
        ("checkpoint file assets/tiny/nope.safetensors is missing", "lora_tools.tiny_assets --out assets/tiny"),
        ("checkpointer.checkpoint_files=[nope.safetensors]",),
    ),
    # --- shapes: decided before any weights are read -----------------------------------------------------------
    Case(
        "builder-does-not-match-checkpoint",  # the 3B builder on the tiny checkpoint: meta-device build, 1 line
        ("lora_llama3_2_3b does not match the checkpoint", f"vocab_size 128256 (checkpoint: {tiny_vocab_size()})"),
        SHIPPED_3B_ON_TINY,
        config="lora_finetune_single_device.yaml",
    ),
    Case(
        "resume-with-another-lora-rank",
        ("LoRA settings", "differ from the checkpoint", "(16, 256) in the checkpoint but (8, 256)", "new output_dir"),
        ("model.lora_rank=8", "model.lora_alpha=16", "resume_from_checkpoint=True"),
        prepare=lambda tmp, monkeypatch: train_one_step(tmp / "out"),
    ),
    Case(
        "start-adapter-with-another-lora-rank",  # an SFT run's adapter, rank 16; this config asks for rank 8
        ("(16, 256) in the checkpoint but (8, 256)", "set lora_rank, lora_alpha and the targets as that run had them"),
        ("start_adapter={tmp}/sft", "model.lora_rank=8", "model.lora_alpha=16"),
        prepare=lambda tmp, monkeypatch: train_one_step(tmp / "sft"),
    ),
    Case(
        "start-adapter-with-another-lora-alpha",  # the same shapes, another scale
        ("start_adapter: model.lora_alpha is 64 here but 32 in the run that trained",),
        ("start_adapter={tmp}/sft", "model.lora_alpha=64"),
        prepare=lambda tmp, monkeypatch: train_one_step(tmp / "sft"),
    ),
    Case(
        "resume-with-another-schedule-length",
        ("learning-rate schedule", "allow_schedule_change=True"),
        ("epochs=3", "max_steps_per_epoch=1", "resume_from_checkpoint=True"),
        prepare=lambda tmp, monkeypatch: train_one_step(tmp / "out"),
    ),
]

TIMINGS: dict[str, tuple[float, str]] = {}


def _sub(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp))


def _snapshot(folder: Path) -> dict[str, tuple[int, int]] | None:
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def recipe():
    import lora_finetune_single_device

    return lora_finetune_single_device


@pytest.fixture
def restored_environ():
    """load_env writes os.environ directly: put it back exactly after each case."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def prepare_case(case: Case, tmp: Path, monkeypatch) -> None:
    """Files, environment, working folder, and the case's own preparation: everything before the run."""
    for name, content in case.files.items():
        path = tmp / _sub(name, tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "HOME": str(tmp), **case.env}
    for key, value in env.items():
        monkeypatch.delenv(key, raising=False) if value is None else monkeypatch.setenv(key, _sub(value, tmp))
    if case.in_tmp:
        for name in ("configs", "assets", "lora_finetune_single_device.yaml"):
            (tmp / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp if case.in_tmp else REPO)
    if case.prepare is not None:
        case.prepare(tmp, monkeypatch)


def run_case(case: Case, tmp: Path, monkeypatch, recipe) -> tuple[int, float]:
    """The entry point's exit status, and the seconds it took."""
    start = time.monotonic()
    if case.entry == "recipe":
        argv = [case.config, f"output_dir={tmp}/out", *case.overrides]
        monkeypatch.setattr(sys, "argv", ["lora_finetune_single_device.py", "--config", *(_sub(a, tmp) for a in argv)])
        status = recipe.main()
    elif case.entry == "wb":
        import wb

        status = wb.main([])
    elif case.entry == "download":
        from lora_tools import download

        status = download.main(["meta-llama/Llama-3.2-1B", "--output-dir", str(tmp / "out")])
    else:
        raise ValueError(case.entry)
    return status, time.monotonic() - start


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, tmp_path, monkeypatch, capfd, recipe, restored_environ):
    out = tmp_path / "out"
    prepare_case(case, tmp_path, monkeypatch)
    before = _snapshot(out)
    capfd.readouterr()  # only the run's own output counts
    status, seconds = run_case(case, tmp_path, monkeypatch, recipe)
    captured = capfd.readouterr()
    text = captured.out + captured.err
    lines = [ln for ln in captured.err.splitlines() if ln.strip() and not ln.startswith(TORCHAO_NOTICE)]
    TIMINGS[case.name] = (seconds, lines[0] if lines else "")
    assert status == case.status, text[-3000:]
    assert "Traceback" not in text
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for word in case.expect:
        assert word in lines[0], lines[0]
    for word in case.absent:
        assert word not in lines[0], lines[0]
    for secret in case.secrets:
        assert secret not in text
    assert "Resuming from" not in text  # a refused resume prints its error alone
    after = _snapshot(out)
    assert after == before or (before is None and after == {}), f"the run wrote into {out}: {after}"


# --- the same line through the real `tune run`, imports included ---------------------------------------------


def _tune_case(name, tmp_path, *overrides, config="configs/tiny.yaml", **env):
    start = time.monotonic()
    args = ["--config", config, f"output_dir={tmp_path}/out", *overrides]
    result = tune("run", "lora_finetune_single_device.py", *args, env=offline_env(HOME=str(tmp_path), **env))
    seconds = time.monotonic() - start
    text = result.stdout + result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith(TORCHAO_NOTICE)]
    assert result.returncode == 2, text[-3000:]
    assert "Traceback" not in text
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert not (tmp_path / "out").exists()
    TIMINGS[f"tune run: {name}"] = (seconds, lines[0])
    return lines[0], text


def test_tune_run_component_typo(tmp_path):
    line, _ = _tune_case(
        "model-component-typo", tmp_path, "model._component_=torchtune.models.llama3_2.lora_llama3_2_3bb"
    )
    assert "did you mean torchtune.models.llama3_2.lora_llama3_2_3b?" in line


def test_tune_run_wandb_key_wrong_shape(tmp_path):
    line, text = _tune_case(
        "wandb-key-wrong-shape", tmp_path, WANDB_LOGGER, WANDB_MODE="online", WANDB_API_KEY=SHORT_WANDB_KEY
    )
    assert "WANDB_API_KEY in the environment has the wrong shape (API key must have 40+ characters, has 12.)" in line
    assert "https://wandb.ai/authorize" in line and SHORT_WANDB_KEY not in text


def test_tune_run_hub_dataset_offline(tmp_path):
    """A Hub dataset name with HF_DATASETS_OFFLINE=1 set when the process starts, as `make demo` sets it (in
    this test process, datasets read the variable at its first import, whenever that was)."""
    line, _ = _tune_case("own-hub-dataset-offline", tmp_path, "dataset.source=someone/chats", config=OWN)
    assert "dataset.source 'someone/chats' is not a local file" in line
    assert "could not be loaded from the Hugging Face Hub (Couldn't reach 'someone/chats' on the Hub" in line


DISK_FULL_RUNS = {
    # 8 MiB: preflight's least need (one 4.5 MB step checkpoint, no merged model) fits; the second checkpoint not.
    "step-checkpoint": ("8M", "save_adapter_weights_only=True", "the step 2 checkpoint", "step_0000001"),
    # 20 MiB: one checkpoint and the merged model fit; three checkpoints and the merged model do not.
    "merged-model": ("20M", "save_adapter_weights_only=False", "the merged model", "step_0000003"),
}


@pytest.mark.parametrize("what", DISK_FULL_RUNS)
def test_disk_fills_during_a_save(tmp_path, what):
    """A small disk (a tmpfs in a private mount namespace) that preflight accepts and that fills while a save is
    written: one error line last, exit 2, the partial folder removed, `latest` on the last complete checkpoint."""
    size, adapter_only, while_writing, latest = DISK_FULL_RUNS[what]
    small = tmp_path / "small"
    small.mkdir()
    out = small / "out"
    args = f"--config configs/tiny.yaml output_dir={out} max_steps_per_epoch=3 save_every_n_steps=1 keep_last_n=null"
    args += f" {adapter_only} val_dataset=null sample_prompts=[]"
    cmd = (
        f"mount -t tmpfs -o size={size} tmpfs {small} && cd {REPO} && {sys.executable} -m torchtune._cli.tune "
        f"run lora_finetune_single_device.py {args}; status=$?; echo LEFT:; find {out} -name '.tmp-*'; "
        f"cat {out}/checkpoints/latest; exit $status"
    )
    start = time.monotonic()
    result = subprocess.run(["unshare", "-m", "sh", "-c", cmd], env=offline_env(), capture_output=True, text=True)
    seconds = time.monotonic() - start
    text = result.stdout + result.stderr
    assert result.returncode == 2, text[-3000:]
    assert "Traceback" not in text
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "disk filled up while writing " + while_writing in errors[0], errors
    assert result.stderr.strip().splitlines()[-1] == errors[0]  # the last word is the error
    assert result.stdout.split("LEFT:", 1)[1].split() == [latest]  # no partial folder; `latest` is complete
    TIMINGS[f"tune run: disk-fills-during-a-save ({what})"] = (seconds, errors[0])


def test_battery_size(capsys):
    """Last in this file: the case count, and each case's time and line when the battery ran."""
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)) and len(CASES) >= 32, len(CASES)
    with capsys.disabled():
        print(f"\n{len(CASES)} bad-input cases in-process + 3 through `tune run`; {len(TIMINGS)} ran in this session:")
        for name, (seconds, line) in TIMINGS.items():
            print(f"  {seconds:6.2f}s  {name:36}  {line}")
