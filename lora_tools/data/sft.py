"""Dataset builders for a user's own data, rendered with the base model's chat template.

    dataset:
      _component_: lora_tools.data.sft.conversation_dataset
      source: data/chats.jsonl          # .json, .jsonl, .csv, .parquet, or a Hugging Face Hub dataset name
      chat_template: ${checkpointer.checkpoint_dir}
      tools: data/tools.json            # optional: tool schemas for every row (or a tools column per row)

Every row is read, checked and tokenized when the dataset is built, before any weights load: a bad row stops the
run at once with its file and row number, and the data summary (lora_tools.data.summary) is exact, including how
many tokens truncation at ``tokenizer.max_seq_len`` drops.
"""

from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch.utils.data import Dataset
from torchtune import utils
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from lora_tools.config.settings import as_list
from lora_tools.data import records
from lora_tools.data.chat_template import TRAIN_ON, ChatFormat
from lora_tools.errors import UserError

log = utils.get_logger("INFO")


class TokenizedConversations(Dataset):
    """Conversations tokenized once: ``tokens`` and ``labels`` (the token where trained, else ignored).

    Labels are not shifted here (lora_tools.data.batching shifts them per sample, as for torchtune's datasets).
    ``full_lengths[i]`` is sample i's length before truncation at ``max_seq_len``.
    """

    def __init__(self, fmt: ChatFormat, conversations, train_on: str, max_seq_len: int | None):
        self.chat_format = fmt
        self._tokens, self._trained = [], []
        self.full_lengths: list[int] = []
        for where, messages, tools in conversations:
            try:
                ids, trained = fmt.tokenize(messages, train_on, tools)
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
            self.full_lengths.append(len(ids))
            if max_seq_len is not None:
                ids, trained = ids[:max_seq_len], trained[:max_seq_len]
            self._tokens.append(array("i", ids))
            self._trained.append(bytes(trained))
        log.info(f"Conversations rendered with {fmt.source}; trained: {TRAIN_ON[train_on]}.")

    def __len__(self) -> int:
        return len(self._tokens)

    def __getitem__(self, index: int) -> dict[str, Any]:
        tokens = self._tokens[index].tolist()
        trained = self._trained[index]
        labels = [t if keep else CROSS_ENTROPY_IGNORE_IDX for t, keep in zip(tokens, trained, strict=True)]
        return {"tokens": tokens, "labels": labels}

    def lengths(self) -> list[int]:
        return [len(t) for t in self._tokens]

    def trained_counts(self) -> list[int]:
        return [sum(t) for t in self._trained]


@dataclass(frozen=True)
class ChatSection:
    """How the config's first dataset renders conversations, so that prompts at inference and the exported
    template are the training data's."""

    chat_template: str | None
    chat_template_kwargs: dict
    system_prompt: str | None
    tools: list[dict] | None  # the dataset's tools file, which every prompt carries


def own_data_section(cfg) -> ChatSection | None:
    """The first dataset's ChatSection when this module (or lora_tools.data.preference) builds it; None for
    torchtune's builders."""
    first = as_list(cfg.dataset)[0]
    if not str(first.get("_component_", "")).startswith((f"{__name__}.", "lora_tools.data.preference.")):
        return None
    kwargs = first.get("chat_template_kwargs", None)
    kwargs = OmegaConf.to_container(kwargs, resolve=True) if kwargs is not None else {}
    tools = read_tools(first.get("tools", None))
    return ChatSection(first.get("chat_template", None), kwargs, first.get("system_prompt", None), tools)


def read_tools(path: str | None, section: str = "dataset") -> list[dict] | None:
    """The tool schemas in a JSON file (a list of OpenAI-style function schemas); None without a file."""
    if path is None:
        return None
    file = Path(str(path))
    if not file.is_file():
        raise UserError(f"{section}.tools: {file} does not exist; give a JSON file holding a list of tool schemas")
    text = records.read_text(file)
    return records.tools(f"{section}.tools", text, f"file {file}")


def _check_train_on(train_on: str, section: str = "dataset") -> None:
    if train_on not in TRAIN_ON:
        raise UserError(f"{section}.train_on is {train_on!r}; use one of {', '.join(TRAIN_ON)}")


def conversation_dataset(
    tokenizer,
    source: str,
    split: str = "train",
    *,
    conversation_column: str = "messages",
    train_on: str = "assistant",
    chat_template: str | None = None,
    chat_template_kwargs: dict | None = None,
    tools: str | None = None,
    tools_column: str = "tools",
    packed: bool = False,
) -> TokenizedConversations:
    """Conversations (OpenAI ``messages`` or ShareGPT ``conversations``), one per row, tool calls included.

    Args:
        source: a local .json/.jsonl/.csv/.parquet file, or a Hugging Face Hub dataset name.
        conversation_column: the column holding each row's list of messages (ShareGPT exports: conversations).
        train_on: "assistant" (every assistant turn), "last" (the last assistant turn), or "all" tokens.
        chat_template: the base model's folder (its tokenizer_config.json), that file, or a .jinja file;
            null: the Llama 3 format.
        chat_template_kwargs: extra template variables, e.g. {date_string: "26 Jul 2024"}.
        tools: a JSON file with the tool schemas (OpenAI function-calling format) of every conversation.
        tools_column: a row's own tool schemas, where it has this column (it wins over ``tools``).
        split: the Hub dataset's split (ignored for a local file).
        packed: read by the recipe (lora_tools.data.batching packs after the label shift).
    """
    del packed
    _check_train_on(train_on)
    shared = read_tools(tools)

    def conversation(where, row):
        messages = records.conversation(where, row, conversation_column, "dataset")
        own = records.tools(where, row.get(tools_column), f"column '{tools_column}'")
        return messages, own if row.get(tools_column) is not None else shared

    return _tokenized(tokenizer, source, split, chat_template, chat_template_kwargs, conversation, train_on)


def instruction_dataset(
    tokenizer,
    source: str,
    prompt_column: str = "instruction",
    completion_column: str = "output",
    input_column: str | None = "input",
    system_prompt: str | None = None,
    train_on_input: bool = False,
    chat_template: str | None = None,
    chat_template_kwargs: dict | None = None,
    split: str = "train",
    packed: bool = False,
) -> TokenizedConversations:
    """Instructions with answers (alpaca fields, or prompt/completion pairs), each row a one-turn conversation.

    Args:
        source: a local .json/.jsonl/.csv/.parquet file, or a Hugging Face Hub dataset name.
        prompt_column, completion_column: the columns holding the user's request and the answer to learn.
        input_column: a column appended to the prompt after a blank line when not empty (alpaca's input);
            null if the data has none.
        system_prompt: a system message put before every prompt; null for none.
        train_on_input: also train on the prompt (default: the answer and its end-of-turn token only).
        chat_template, chat_template_kwargs, split, packed: as for conversation_dataset.
    """
    del packed

    def conversation(where, row):
        columns = (prompt_column, completion_column, input_column)
        return records.instruction(where, row, *columns, system_prompt, "dataset"), None

    train_on = "all" if train_on_input else "assistant"
    return _tokenized(tokenizer, source, split, chat_template, chat_template_kwargs, conversation, train_on)


def _tokenized(tokenizer, source, split, chat_template, chat_template_kwargs, conversation, train_on):
    """Every row of ``source`` as ``conversation(where, row)`` makes it (messages, tools), tokenized with the chat
    template."""
    fmt = ChatFormat(tokenizer, chat_template, chat_template_kwargs)
    rows = ((where, *conversation(where, row)) for where, row in records.read_rows(str(source), split))
    return TokenizedConversations(fmt, rows, train_on, tokenizer.max_seq_len)
