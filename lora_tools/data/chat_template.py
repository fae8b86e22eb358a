"""Conversations as token ids, in the prompt format the model is served with.

Servers (transformers, vLLM, llama.cpp, Ollama) format a conversation with the model's own chat template, the
Jinja ``chat_template`` in its tokenizer_config.json. Llama 3.2 Instruct's starts every prompt with a system
block (knowledge cutoff and date); torchtune's tokenizer leaves it out. A model trained on one format and
served with another loses part of what it learned, so training renders with the model's template here, the
way Hugging Face's ``apply_chat_template`` renders it, and tokenizes the text as Hugging Face does: special-token
strings become their ids, the text between them goes through the BPE.

Trained tokens are found from the template itself: an assistant turn is the text that rendering
``messages[:i + 1]`` adds after rendering ``messages[:i]`` with the generation prompt. So whatever a template
writes around a turn, the model learns the turn's content and its end-of-turn token, never the prompt. A turn
that calls a tool is an assistant turn like any other (the call as the template writes it, and its end-of-turn
token); tool results and the tool schemas the template prints are prompt.
"""

import json
import re
from datetime import datetime
from functools import cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from torchtune import utils

from lora_tools.errors import UserError

log = utils.get_logger("INFO")

# The date a template reads as "today" (strftime_now). Fixed, so that every run, resumed or not, renders the
# same tokens; a template that prints it (Llama 3.2's system block) gets Llama 3.2's own fallback date.
TEMPLATE_DATE = datetime(2024, 7, 26)

# Where a base model has no chat template: the Llama 3 format as torchtune's tokenizer writes it (content
# stripped; no system block, a system message, if any, is an ordinary turn).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

TRAIN_ON = {"assistant": "every assistant turn", "last": "the last assistant turn", "all": "every token"}


class _GenerationBlocks(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask markers) render their body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@cache
def _environment() -> ImmutableSandboxedEnvironment:
    """Jinja set up as transformers sets it up for chat templates (sandboxed, trimmed blocks, its helpers)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationBlocks]
    )

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = TEMPLATE_DATE.strftime
    return env


def render_template(
    template: str, messages: list[dict], add_generation_prompt: bool, variables: dict, tools: list[dict] | None = None
) -> str:
    """A chat template rendered as transformers renders it (for a template that is not a model's file)."""
    return _compiled(template).render(
        messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **variables
    )


@cache
def _compiled(template: str) -> jinja2.Template:
    """A template compiled once (compiling takes far longer than rendering)."""
    return _environment().from_string(template)


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken mapping with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_template(location: str | None) -> tuple[str, dict[str, str], str]:
    """(template, special-token variables, where it came from) for a model folder, its tokenizer_config.json, or
    a .jinja file. ``None``: the Llama 3 format. A tokenizer_config.json without a template (a base, not an
    Instruct, model): the Llama 3 format, with a warning."""
    if location is None:
        return LLAMA3_TEMPLATE, {}, "the Llama 3 format (chat_template: null)"
    path = Path(location)
    if path.is_dir():
        if not (path / "tokenizer_config.json").is_file() and (path / "chat_template.jinja").is_file():
            path = path / "chat_template.jinja"
        else:
            path = path / "tokenizer_config.json"
            if not path.is_file():
                raise UserError(
                    f"chat_template {location} has no tokenizer_config.json; point it at the base model's folder "
                    "(its Hugging Face tokenizer files), or set chat_template: null for the plain Llama 3 format"
                )
    if not path.is_file():
        raise UserError(f"chat_template {location} does not exist; give the base model's folder or null")
    if path.suffix == ".jinja":
        return path.read_text(encoding="utf-8"), {}, f"the chat template in {path}"
    try:
        tokenizer_config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"chat_template {path} is not valid JSON ({e}); give the base model's folder or null")
    if not isinstance(tokenizer_config, dict):
        raise UserError(f"chat_template {path} is not a tokenizer_config.json; give the base model's folder or null")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one is the chat template
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (path.parent / "chat_template.jinja").is_file():  # newer transformers save it apart
        template = (path.parent / "chat_template.jinja").read_text(encoding="utf-8")
    special = {k: _token_text(v) for k, v in tokenizer_config.items() if k.endswith("_token")}
    special = {k: v for k, v in special.items() if v is not None}
    if not isinstance(template, str):
        log.warning(
            f"{path} has no chat_template (a base model?): conversations use the plain Llama 3 format, without "
            "the system block Llama 3.2 Instruct's template writes. Set chat_template: null to say so."
        )
        return LLAMA3_TEMPLATE, special, f"the Llama 3 format ({path} has no chat_template)"
    return template, special, f"the chat template in {path}"


class SpecialTokenText:
    """Text to ids as Hugging Face's tokenizer cuts it: special-token strings (``<|eot_id|>``) are their ids, the
    rest goes through the torchtune tokenizer. Rendered chat templates and harness prompts are such text."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.ids = dict(tokenizer.special_tokens)
        names = sorted(self.ids, key=len, reverse=True)
        self._pattern = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def encode(self, text: str) -> list[int]:
        pieces = self._pattern.split(text) if self._pattern else [text]
        ids = []
        for i, piece in enumerate(pieces):
            if i % 2:
                ids.append(self.ids[piece])
            elif piece:
                ids.extend(self._tokenizer.encode(piece, add_bos=False, add_eos=False))
        return ids


class ChatFormat:
    """A model's chat template and tokenizer: conversation -> (token ids, which of them are trained)."""

    def __init__(self, tokenizer, location: str | None = None, variables: dict | None = None):
        template, special, self.source = read_template(location)
        try:
            self._template = _compiled(template)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"{self.source} does not parse (line {e.lineno}: {e.message})")
        if not hasattr(getattr(tokenizer, "tt_model", None), "tt_model"):
            raise UserError(
                f"lora_tools.data.sft datasets need torchtune's Llama 3 tokenizer (tiktoken), not "
                f"{type(tokenizer).__name__}; use torchtune.models.llama3.llama3_tokenizer"
            )
        self._tokenizer = tokenizer
        self._variables = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", **special, **(variables or {})}
        self._text = SpecialTokenText(tokenizer)
        self._special_bytes = {i: name.encode() for name, i in self._text.ids.items()}

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
        """The conversation as text, as ``apply_chat_template(messages, tools=tools, **variables)`` renders it."""
        try:
            return self._template.render(
                messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
                **self._variables,
            )  # fmt: skip
        except jinja2.TemplateError as e:
            raise UserError(f"{self.source} refused the conversation: {e}") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as Hugging Face's tokenizer gives them: special-token strings are their ids."""
        return self._text.encode(text)

    def prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The conversation so far and the assistant header: what a server feeds the model to answer."""
        return self.encode(self.render(messages, add_generation_prompt=True, tools=tools))

    def tokenize(
        self, messages: list[dict], train_on: str = "assistant", tools: list[dict] | None = None
    ) -> tuple[list[int], list[bool]]:
        """Token ids of the whole conversation and, per token, whether training predicts it.

        ``train_on``: "assistant" (every assistant turn), "last" (the last assistant turn) or "all" (every token
        but the first). A token is trained when any of its bytes lies in a trained turn.
        """
        text = self.render(messages, tools=tools)
        ids = self.encode(text)
        if train_on == "all":
            return ids, [False] + [True] * (len(ids) - 1)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if train_on == "last":
            turns = turns[-1:]
        spans = []
        for i in turns:
            before = self.render(messages[:i], add_generation_prompt=True, tools=tools)
            through = self.render(messages[: i + 1], tools=tools)
            if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
                raise UserError(
                    f"{self.source} does not render a conversation as the sum of its turns, so "
                    "its assistant turns cannot be found; use train_on: all or another chat_template"
                )
            spans.append((len(before.encode()), len(through.encode())))
        trained, offset = [], 0
        for token_bytes in self._token_bytes(ids):
            end = offset + len(token_bytes)
            trained.append(any(start < end and offset < stop for start, stop in spans))
            offset = end
        return ids, trained

    def _token_bytes(self, ids: list[int]) -> list[bytes]:
        encoding = self._tokenizer.tt_model.tt_model  # the tiktoken Encoding behind torchtune's Llama 3 tokenizer
        return [self._special_bytes.get(i) or encoding.decode_single_token_bytes(i) for i in ids]
