"""Preference pairs (a prompt, a chosen and a rejected response) for DPO/ORPO, rendered with the model's template.

    dataset:
      _component_: lora_tools.data.preference.preference_dataset
      source: data/pairs.jsonl          # .json, .jsonl, .csv, .parquet, or a Hugging Face Hub dataset name
      chat_template: ${checkpointer.checkpoint_dir}

A row is ``prompt``/``chosen``/``rejected`` text, TRL's conversational form (message lists), or, without a
prompt column, two whole conversations sharing their first turns (Anthropic HH, as message lists or as its
``\\n\\nHuman: ...\\n\\nAssistant: ...`` text). Each response is one assistant turn. Every row is read, checked and
tokenized when the dataset is built; a bad row stops the run with its file and row number.
"""

import json
import math
import re
from array import array
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset
from torchtune import utils
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from lora_tools.data import records
from lora_tools.data.chat_template import ChatFormat
from lora_tools.data.summary import TRUNCATION_WARNING_SHARE
from lora_tools.errors import UserError

log = utils.get_logger("INFO")

HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _value(where: str, row: dict, column: str, setting: str) -> object:
    if column not in row or row[column] is None:
        has = ", ".join(str(k) for k, v in row.items() if v is not None) or "no columns"
        raise UserError(f"{where}: no '{column}' column (the row has: {has}); fix the row or set dataset.{setting}")
    return row[column]


def _hh_text(text: str) -> bool:
    return text.lstrip().startswith("Human:")


def _hh_messages(text: str) -> list[dict]:
    """Anthropic HH's text form, ``\\n\\nHuman: ...\\n\\nAssistant: ...``, as messages."""
    pieces = HH_TURN.split(text.lstrip())  # text starting with "Human:": pieces[0] is empty
    return [{"role": HH_ROLES[r], "content": c.strip()} for r, c in zip(pieces[1::2], pieces[2::2], strict=True)]


def _json_messages(text: str) -> str | list:
    """A CSV cell's JSON text of a message list as that list; any other text as it is."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    is_messages = isinstance(value, list) and value and all(isinstance(m, dict) for m in value)
    return value if is_messages else text


def _messages(where: str, value: object, column: str, text_role: str | None) -> list[dict]:
    """A column's messages: a list of OpenAI or ShareGPT messages (or its JSON text, as CSV holds it), HH text,
    or plain text as one ``text_role`` message."""
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            value = _json_messages(value)
        elif _hh_text(value) and text_role is None:
            return _hh_messages(value)
    if isinstance(value, str):
        if text_role is None:
            raise UserError(
                f"{where}: column '{column}' is text, but without a prompt column each of chosen and rejected must "
                "be a whole conversation (a list of messages, or HH's '\\n\\nHuman: ... \\n\\nAssistant: ...' text)"
            )
        return [{"role": text_role, "content": value}]
    if not isinstance(value, list):
        raise UserError(f"{where}: column '{column}' holds {type(value).__name__}, not text or a list of messages")
    return [records.message(f"{where}, column '{column}', message {n}", m) for n, m in enumerate(value, start=1)]


def _shared_prompt(where: str, chosen: list[dict], rejected: list[dict]) -> int:
    """How many whole messages two conversations share before their responses (HH style)."""
    if chosen == rejected:  # the same conversation twice: the responses are its last assistant turn
        k = max((i for i, m in enumerate(chosen) if m["role"] == "assistant"), default=None)
        if k is None:
            raise UserError(f"{where}: the conversations have no assistant turn to be the response; add one")
    else:
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
    if k == 0:
        raise UserError(
            f"{where}: chosen and rejected share no first message, so there is no prompt; without a prompt column "
            "both must be the whole conversation, the same up to the response"
        )
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if k == len(messages):
            raise UserError(f"{where}: the {name} conversation has no response after the turns the two share")
        if messages[k]["role"] != "assistant":
            raise UserError(
                f"{where}: chosen and rejected first differ at message {k + 1}, a {messages[k]['role']} message; they "
                "must share every turn up to the response, which is an assistant message"
            )
    return k


def pair_messages(
    where: str, row: dict, prompt_column: str, chosen_column: str, rejected_column: str, system_prompt: str | None
) -> tuple[list[dict], dict, dict]:
    """(prompt messages, chosen message, rejected message) of one row, checked."""
    chosen_value = _value(where, row, chosen_column, "chosen_column")
    rejected_value = _value(where, row, rejected_column, "rejected_column")
    if row.get(prompt_column) is not None:
        prompt = _messages(where, row[prompt_column], prompt_column, "user")
        chosen = _messages(where, chosen_value, chosen_column, "assistant")
        rejected = _messages(where, rejected_value, rejected_column, "assistant")
    else:
        chosen = _messages(where, chosen_value, chosen_column, None)
        rejected = _messages(where, rejected_value, rejected_column, None)
        k = _shared_prompt(where, chosen, rejected)
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    if not prompt:
        raise UserError(f"{where}: column '{prompt_column}' is empty; give the prompt the responses answer")
    responses = []
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            roles = ", ".join(m["role"] for m in messages)
            what = f"a {roles} message" if len(messages) == 1 else f"{len(messages)} messages ({roles or 'none'})"
            raise UserError(
                f"{where}: the {name} response is {what}; it must be one assistant message (earlier turns belong in "
                "the prompt)"
            )
        if not messages[0]["content"].strip():
            raise UserError(f"{where}: the {name} response is empty; write it or remove the row")
        responses.append(messages[0])
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return prompt, responses[0], responses[1]


class PreferencePairs(Dataset):
    """Pairs tokenized once. An item holds ``chosen_tokens``/``chosen_labels`` and ``rejected_tokens``/
    ``rejected_labels``: the same prompt tokens, then the response; a label is the token where trained (the
    response and its end-of-turn token), else ignored. Labels are not shifted.

    Per pair: ``prompt_lengths`` (kept), ``full_prompt_lengths`` (before truncation), ``chosen_lengths``,
    ``rejected_lengths`` (response tokens) and ``identical`` (the two responses are the same tokens).
    """

    def __init__(self, fmt: ChatFormat, pairs, max_seq_len: int | None):
        self.chat_format, self.max_seq_len = fmt, max_seq_len
        self._prompts, self._chosen, self._rejected = [], [], []
        self.full_prompt_lengths = array("i")
        for where, (prompt, chosen, rejected) in pairs:
            try:
                prompt_ids = fmt.prompt(prompt)
                responses = [self._response(fmt, prompt, prompt_ids, m) for m in (chosen, rejected)]
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
            self.full_prompt_lengths.append(len(prompt_ids))
            longest = max(len(r) for r in responses)
            if max_seq_len is not None and len(prompt_ids) + longest > max_seq_len:
                if longest >= max_seq_len:
                    which = "chosen" if len(responses[0]) == longest else "rejected"
                    raise UserError(
                        f"{where}: the {which} response is {longest} tokens, leaving no room for the prompt within "
                        f"tokenizer.max_seq_len {max_seq_len}; raise tokenizer.max_seq_len or shorten the response"
                    )
                prompt_ids = prompt_ids[len(prompt_ids) + longest - max_seq_len :]  # cut from the left
            self._prompts.append(array("i", prompt_ids))
            self._chosen.append(array("i", responses[0]))
            self._rejected.append(array("i", responses[1]))
        log.info(f"Preference pairs rendered with {fmt.source}; trained: each response and its end-of-turn token.")

    @staticmethod
    def _response(fmt: ChatFormat, prompt: list[dict], prompt_ids: list[int], response: dict) -> list[int]:
        ids = fmt.encode(fmt.render([*prompt, response]))
        if ids[: len(prompt_ids)] != prompt_ids:
            raise UserError(
                f"{fmt.source} does not render the prompt and response as the prompt followed by the response, "
                "so the response cannot be found; use another chat_template"
            )
        return ids[len(prompt_ids) :]

    def __len__(self) -> int:
        return len(self._prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        prompt = self._prompts[index].tolist()
        ignored = [CROSS_ENTROPY_IGNORE_IDX] * len(prompt)
        item = {}
        for name, responses in (("chosen", self._chosen), ("rejected", self._rejected)):
            response = responses[index].tolist()
            item[f"{name}_tokens"], item[f"{name}_labels"] = prompt + response, ignored + response
        return item

    @property
    def prompt_lengths(self) -> list[int]:
        return [len(p) for p in self._prompts]

    @property
    def chosen_lengths(self) -> list[int]:
        return [len(r) for r in self._chosen]

    @property
    def rejected_lengths(self) -> list[int]:
        return [len(r) for r in self._rejected]

    @property
    def identical(self) -> list[bool]:
        return [c == r for c, r in zip(self._chosen, self._rejected, strict=True)]

    def summary(self) -> "PairSummary":
        return PairSummary.of([self])


@dataclass(frozen=True)
class PairSummary:
    """Per-pair counts, with DataSummary's reporting methods (lines, log, truncation_warning,
    require_trained_tokens). A pair's length is its prompt and its longer response: its longer sequence."""

    prompt_lengths: list[int]
    full_prompt_lengths: list[int]
    chosen_lengths: list[int]
    rejected_lengths: list[int]
    identical: list[bool]
    max_seq_len: int | None

    @classmethod
    def of(cls, parts: list[PreferencePairs]) -> "PairSummary":
        """The summary of several datasets of pairs together."""
        fields = ("prompt_lengths", "full_prompt_lengths", "chosen_lengths", "rejected_lengths", "identical")
        values = {f: [x for part in parts for x in getattr(part, f)] for f in fields}
        return cls(**values, max_seq_len=parts[0].max_seq_len if parts else None)

    @property
    def pairs(self) -> int:
        return len(self.prompt_lengths)

    @property
    def lengths(self) -> list[int]:
        """Tokens per pair as kept: the prompt and the longer response."""
        return [
            p + max(c, r)
            for p, c, r in zip(self.prompt_lengths, self.chosen_lengths, self.rejected_lengths, strict=True)
        ]

    @property
    def full_lengths(self) -> list[int]:
        """Tokens per pair before truncation."""
        return [
            p + max(c, r)
            for p, c, r in zip(self.full_prompt_lengths, self.chosen_lengths, self.rejected_lengths, strict=True)
        ]

    @property
    def truncated(self) -> int:
        return sum(full > kept for full, kept in zip(self.full_prompt_lengths, self.prompt_lengths, strict=True))

    @property
    def tokens_cut(self) -> int:
        return sum(self.full_prompt_lengths) - sum(self.prompt_lengths)

    @property
    def truncated_share(self) -> float:
        return self.truncated / self.pairs if self.pairs else 0.0

    @property
    def identical_pairs(self) -> int:
        return sum(self.identical)

    def percentile(self, p: float) -> int:
        """Pair length before truncation at percentile ``p``, nearest-rank."""
        lengths = sorted(self.full_lengths)
        return lengths[max(0, min(len(lengths) - 1, math.ceil(p / 100 * len(lengths)) - 1))]

    def lines(self, name: str = "dataset") -> list[str]:
        if not self.pairs:
            return [f"{name}: no pairs"]
        pct = self.percentile
        trained = sum(self.chosen_lengths) + sum(self.rejected_lengths)
        out = [
            f"{name}: {self.pairs} preference pairs, {2 * sum(self.prompt_lengths) + trained:,} tokens in the chosen "
            f"and rejected sequences, {trained:,} of them trained (the responses); tokens per pair (prompt + longer "
            f"response) p50 {pct(50)}, p90 {pct(90)}, max {pct(100)}"
        ]
        if self.max_seq_len is not None:
            out.append(
                f"{name}: prompts cut from the left to fit tokenizer.max_seq_len {self.max_seq_len}: {self.truncated} "
                f"pairs ({100 * self.truncated_share:.1f}%), {self.tokens_cut:,} prompt tokens cut"
            )
        out.append(f"{name}: pairs whose chosen and rejected responses are the same tokens: {self.identical_pairs}")
        return out

    def truncation_warning(self, name: str = "dataset") -> str | None:
        if self.truncated_share <= TRUNCATION_WARNING_SHARE:
            return None
        return (
            f"{name}: {self.truncated} of {self.pairs} pairs ({100 * self.truncated_share:.1f}%) are longer than "
            f"tokenizer.max_seq_len={self.max_seq_len} and lose the start of their prompt; raise "
            f"tokenizer.max_seq_len (p99 pair length: {self.percentile(99)}) or shorten those prompts"
        )

    def identical_warning(self, name: str = "dataset") -> str | None:
        if not self.identical_pairs:
            return None
        return (
            f"{name}: {self.identical_pairs} of {self.pairs} pairs have the same chosen and rejected response, so "
            "preference training learns nothing from them; fix or remove those rows"
        )

    def warnings(self, name: str = "dataset") -> list[str]:
        return [w for w in (self.truncation_warning(name), self.identical_warning(name)) if w]

    def require_trained_tokens(self, name: str = "dataset") -> None:
        """Refuse pairs of which no response keeps a token to train on."""
        if self.pairs and not any(self.chosen_lengths) and not any(self.rejected_lengths):
            raise UserError(f"no pair of {name} keeps a response token to train on ({self.pairs} pairs)")

    def log(self, name: str = "dataset") -> None:
        """The summary as INFO lines, and its warnings."""
        for line in self.lines(name):
            log.info(line)
        for warning in self.warnings(name):
            log.warning(warning)


def preference_dataset(
    tokenizer,
    source: str,
    split: str = "train",
    *,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    system_prompt: str | None = None,
    chat_template: str | None = None,
    chat_template_kwargs: dict | None = None,
    packed: bool = False,
) -> PreferencePairs:
    """Preference pairs, one per row.

    Args:
        source: a local .json/.jsonl/.csv/.parquet file, or a Hugging Face Hub dataset name.
        prompt_column, chosen_column, rejected_column: the columns holding each part (text or messages). A row
            without the prompt column holds two whole conversations in chosen and rejected.
        system_prompt: a system message put before every prompt that has none; null for none.
        chat_template: the base model's folder (its tokenizer_config.json), that file, or a .jinja file;
            null: the Llama 3 format.
        chat_template_kwargs: extra template variables, e.g. {date_string: "26 Jul 2024"}.
        split: the Hub dataset's split (refused for a local file).
        packed: must be False; pairs are not packed.
    """
    if packed:
        raise UserError("dataset.packed is True, but preference pairs are not packed; remove dataset.packed")
    fmt = ChatFormat(tokenizer, chat_template, chat_template_kwargs)
    columns = (prompt_column, chosen_column, rejected_column, system_prompt)
    pairs = ((where, pair_messages(where, row, *columns)) for where, row in records.read_rows(str(source), split))
    return PreferencePairs(fmt, pairs, tokenizer.max_seq_len)
