"""Build the tiny, offline stand-in for Llama-3.2-3B-Instruct and alpaca_cleaned.

Everything is generated from a fixed seed by this file, so the demo and the tests need no download,
no account and no GPU, yet exercise the same loading code as the real model:

- ``model.safetensors`` + ``config.json``: a Llama-3.2-shaped model (grouped-query attention, llama3 RoPE
  scaling, tied embeddings) in Hugging Face format, read by torchtune's ``FullModelHFCheckpointer``.
- ``original/tokenizer.model``: a tiktoken BPE file read by torchtune's real ``Llama3Tokenizer``, with
  ``special_tokens.json`` (the added_tokens part of a Hugging Face tokenizer.json) naming its 256 special tokens
  (same names and order as Llama 3's, smaller ids).
- ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``: the same tokenizer for Hugging Face
  (``AutoTokenizer``), laid out like Llama 3's and cutting text into the same ids as the tiktoken file, with
  <|begin_of_text|> as bos, <|eot_id|> as eos and Llama 3.2 Instruct's own chat template (``CHAT_TEMPLATE``).
- ``data/train.json`` and ``data/heldout.json``: the demo task in alpaca format (instruction, input, output):
  the color of each of 30 things, asked in six wordings. For every thing one wording is held out, so each
  held-out question asks a fact that training teaches in words training never pairs with that thing.
  ``data/heldout_choices.jsonl`` holds the same held-out questions with four answer options, for
  ``lora_tools.evaluate`` (``evals/tiny_qa``).
- ``data/pairs_train.jsonl`` and ``data/pairs_heldout.jsonl``: preference pairs on the color questions (the
  held-out ones on the held-out wordings) for ``make demo-dpo``: "The color of the lemon is yellow." preferred to
  "The lemon is yellow.".
- ``data/chat_train.jsonl`` and ``data/chat_heldout.jsonl``: five small tasks (colors, opposites, sums, counting,
  reversing a list) as chats, one ``{"messages": [{"role": ..., "content": ...}, ...]}`` per line (OpenAI
  style): an optional system prompt, then one to three user/assistant exchanges.
- ``data/tools_train.jsonl``, ``data/tools_heldout.jsonl`` and ``data/tools.json``: tool-calling conversations for
  ``make demo-tools`` (OpenAI format): the color demo's questions, each answered by a ``lookup_color`` call, its
  result and a sentence; the function's schema. The tokens of these conversations, as Llama 3.2's template writes
  them, follow the others in the vocabulary, so every earlier token keeps its id and its weights.
- ``tool_base/``: the base model of ``make demo-tools``, with the same tokenizer files: the same random draws at a
  larger scale (``TOOL_BASE_GAIN``, ``TOOL_BASE_QK_GAIN``).

Why the model is shaped as it is: LoRA cannot move embeddings or norms, so with a random 128k-token base
it barely moves the loss. A small vocabulary (256 of its tokens special) is built from the demo's own words. The
weights are drawn with std 1.28 / sqrt(width) (0.08): attention then already mixes tokens at step 0, so LoRA can
learn to read the question. Measured on the demo task: with Hugging Face's std 0.02, and with 0.0625, LoRA
learned one answer for every question; with 0.08 it answers all held-out questions. The price is a first loss
about 13% above ln(vocab size), the loss of a uniform guess (17% before the tool demo added its tokens).

Why the tool demo has a base of its own: Llama 3.2's template writes about 190 tokens (system block, instructions,
the schema) before each question, and on this base LoRA did not learn to copy the asked thing from behind them into
the call. Measured with 30 things and one exchange per conversation, 300 LoRA steps of 8: 22 of 30 held-out calls
exact without the schema in the prompt, none with 170 tokens of plain system prompt instead, and at most 7 with the
schema over a dozen variants (LoRA rank and modules, learning rate, q and k scale). Scaling the draws to std
2.0 / sqrt(width), with 1.2 / sqrt(width) for q and k, gave 26 of 30 after 600 steps and 28 after 800.

Run: ``python -m lora_tools.tiny_assets --out assets/tiny``.
"""

import base64
import json
import random
import re
from pathlib import Path

import regex
import torch
from safetensors.torch import save_file

# Llama 3's pre-tokenisation pattern (the one its tiktoken tokenizer splits text with), so our vocabulary
# matches the pieces the real tokenizer will cut text into.
CL100K_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3's special tokens in id order: these 13, then reserved tokens 2 to 244 (256 in all).
LLAMA3_FIRST_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
    "<|video|>",
]
SEED = 1234
MODEL = dict(  # torchtune llama3_2 component-builder arguments; configs/tiny.yaml repeats them
    num_layers=4,
    num_heads=8,
    num_kv_heads=2,
    embed_dim=256,
    intermediate_dim=768,
    max_seq_len=2048,
    norm_eps=1e-5,
    rope_base=500_000,
    scale_factor=32,
)
INIT_GAIN = 1.28  # weights drawn with std 1.28 / sqrt(width): 0.08 for the tiny model; see the module docstring
# The tool demo's base (tool_base/): the same draws, scaled to std 2.0 / sqrt(width), q and k to 1.2 / sqrt(width)
TOOL_BASE_GAIN, TOOL_BASE_QK_GAIN = 2.0, 1.2

# --- the demo task -------------------------------------------------------------------------------------

# Things and their colors, as a person would answer (the demo's answers are meant to be checked by eye).
THING_COLORS = {
    "apple": "red",
    "banana": "yellow",
    "cherry": "red",
    "lemon": "yellow",
    "grape": "purple",
    "plum": "purple",
    "carrot": "orange",
    "tomato": "red",
    "pepper": "green",
    "onion": "white",
    "ocean": "blue",
    "forest": "green",
    "desert": "brown",
    "meadow": "green",
    "glacier": "white",
    "volcano": "black",
    "river": "blue",
    "cloud": "white",
    "sunset": "orange",
    "sky": "blue",
    "violin": "brown",
    "coin": "silver",
    "coal": "black",
    "kettle": "silver",
    "pillow": "white",
    "chocolate": "brown",
    "spoon": "silver",
    "snow": "white",
    "grass": "green",
    "mirror": "silver",
}
THINGS = list(THING_COLORS)
COLORS = ["red", "yellow", "green", "blue", "purple", "orange", "white", "black", "brown", "silver"]
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "early": "late",
    "happy": "sad",
    "light": "dark",
    "open": "closed",
    "full": "empty",
    "high": "low",
    "strong": "weak",
    "young": "old",
    "loud": "quiet",
    "near": "far",
    "rich": "poor",
    "soft": "hard",
    "wet": "dry",
    "clean": "dirty",
    "long": "short",
}
ANIMALS = ["cat", "dog", "horse", "rabbit", "tiger", "whale", "eagle", "otter", "panda", "zebra", "camel", "koala"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _color_of(thing: str) -> str:
    return THING_COLORS[thing]


def _example(rng: random.Random) -> dict:
    """One request of the chat data's five tasks, as an alpaca row."""
    kind = rng.randrange(5)
    if kind == 0:
        thing = rng.choice(THINGS)
        q = rng.choice(["What color is the {}?", "Tell me the color of the {}.", "Which color does the {} have?"])
        return {"instruction": q.format(thing), "input": "", "output": f"The {thing} is {_color_of(thing)}."}
    if kind == 1:
        word = rng.choice(sorted(OPPOSITES))
        return {
            "instruction": "Give the opposite of the word.",
            "input": word,
            "output": f"The opposite of {word} is {OPPOSITES[word]}.",
        }
    if kind == 2:
        items = rng.sample(ANIMALS, rng.randint(3, 5))
        return {
            "instruction": "Write the list in reverse order.",
            "input": ", ".join(items),
            "output": ", ".join(reversed(items)) + ".",
        }
    if kind == 3:
        a, b = rng.randint(0, 5), rng.randint(0, 5)
        return {
            "instruction": "Add the two numbers and answer in words.",
            "input": f"{a} and {b}",
            "output": f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.",
        }
    items = rng.sample(ANIMALS, rng.randint(2, 6))
    return {
        "instruction": "How many animals are in the list?",
        "input": ", ".join(items),
        "output": f"There are {NUMBER_WORDS[len(items)]} animals.",
    }


COLOR_QUESTIONS = [
    "What color is the {}?",
    "Tell me the color of the {}.",
    "Which color does the {} have?",
    "What is the color of the {}?",
    "Name the color of the {}.",
    "Do you know the color of the {}?",
]
TRAIN_ROUNDS = 64  # the 150 training questions, each once per round in a fresh order: 9600 rows, 600 steps of 16


def build_dataset(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """The demo's train and held-out splits: one wording per thing held out, the other five for training.

    The train file repeats its questions in shuffled rounds, so the demo's single epoch is its whole run and
    ``max_steps_per_epoch`` alone sets the length, as for a real dataset."""
    rng = random.Random(seed)
    questions, heldout = [], []
    for thing in THINGS:
        held = rng.randrange(len(COLOR_QUESTIONS))
        for i, wording in enumerate(COLOR_QUESTIONS):
            e = {"instruction": wording.format(thing), "input": "", "output": f"The {thing} is {_color_of(thing)}."}
            (heldout if i == held else questions).append(e)
    train = [e for _ in range(TRAIN_ROUNDS) for e in rng.sample(questions, len(questions))]
    return train, heldout


# The preference demo (make demo-dpo): the same questions, an answer that names "the color of" the thing preferred
# to the plain sentence the chat demo taught, which that model therefore prefers before preference tuning.
PAIR_ROUNDS = 8  # the 150 training questions, once per round in a fresh order: 1200 pairs
PAIRS_SEED = SEED + 3  # a stream of its own


def build_preference_pairs(seed: int = PAIRS_SEED) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs ``{"prompt", "chosen", "rejected"}`` on the demo's train and held-out questions:
    chosen "The color of the lemon is yellow.", rejected "The lemon is yellow."."""
    train, heldout = build_dataset()

    def pair(e: dict) -> dict:
        sentence = e["output"]  # "The lemon is yellow."
        thing, color = sentence.split(" ")[1], sentence.rsplit(" ", 1)[1]
        return {"prompt": e["instruction"], "chosen": f"The color of the {thing} is {color}", "rejected": sentence}

    questions = list({e["instruction"]: e for e in train}.values())  # each training question once
    rng = random.Random(seed)
    rounds = [pair(e) for _ in range(PAIR_ROUNDS) for e in rng.sample(questions, len(questions))]
    return rounds, [pair(e) for e in heldout]


# Held-out questions with answer options, for lora_tools.evaluate (evals/tiny_qa): each question's right answer
# and three wrong ones that differ from it only in the color.
CHOICES_SEED = SEED + 2  # a stream of its own


def _wrong_answers(example: dict, rng: random.Random) -> list[str]:
    thing, color = example["output"].removeprefix("The ").removesuffix(".").split(" is ")
    return [f"The {thing} is {c}." for c in rng.sample([c for c in COLORS if c != color], 3)]


def build_choice_questions(heldout: list[dict], seed: int = CHOICES_SEED) -> list[dict]:
    """The held-out samples as questions: text as a user would type it, four options, the index of the right one
    and the exact answer."""
    rng = random.Random(seed)
    out = []
    for e in heldout:
        choices = [e["output"], *_wrong_answers(e, rng)]
        rng.shuffle(choices)
        answer = choices.index(e["output"])
        out.append({"question": _user_text(e), "choices": choices, "answer": answer, "output": e["output"]})
    return out


# Multi-turn chat data: five small tasks (_example) as OpenAI-style messages. System prompts use words the
# vocabulary already has, so they cost a handful of tokens each; they ask for nothing the answers do not already do.
N_CHAT_TRAIN, N_CHAT_HELDOUT = 1000, 100
CHAT_SEED = SEED + 1  # a stream of its own
SYSTEM_PROMPTS = [
    "Write a response that appropriately completes the request.",
    "Give a short answer.",
    "Write the answer in words.",
    "Give the answer in words.",
]


def _user_text(example: dict) -> str:
    return example["instruction"] + (f"\n{example['input']}" if example["input"] else "")


def _conversation(rng: random.Random) -> dict:
    """One chat: half the time a system prompt, then one to three user/assistant exchanges."""
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(rng.randint(1, 3)):
        e = _example(rng)
        messages += [{"role": "user", "content": _user_text(e)}, {"role": "assistant", "content": e["output"]}]
    return {"messages": messages}


def _first_user_text(conversation: dict) -> str:
    return next(m["content"] for m in conversation["messages"] if m["role"] == "user")


def build_chat_dataset(seed: int = CHAT_SEED) -> tuple[list[dict], list[dict]]:
    """Train and held-out chats; no held-out chat opens with a user message that train contains anywhere."""
    rng = random.Random(seed)
    train = [_conversation(rng) for _ in range(N_CHAT_TRAIN)]
    seen = {m["content"] for c in train for m in c["messages"] if m["role"] == "user"}
    heldout = []
    while len(heldout) < N_CHAT_HELDOUT:
        c = _conversation(rng)
        if _first_user_text(c) not in seen:
            heldout.append(c)
            seen.add(_first_user_text(c))
    return train, heldout


# The tool-calling demo (make demo-tools): a color question is answered by calling lookup_color, then by a sentence
# built from the tool's result; the chat tasks' other requests are answered directly. Tool calls are written as
# OpenAI's API returns them (arguments as JSON text) in half the conversations, as an object in the other half.
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_color",
            "description": "Look up the color of a thing.",
            "parameters": {
                "type": "object",
                "properties": {"thing": {"type": "string", "description": "The thing, in one word."}},
                "required": ["thing"],
            },
        },
    }
]
N_TOOL_TRAIN = 5600  # one epoch of configs/tiny_tools.yaml: 700 steps of 8
TOOL_SEED = SEED + 4  # a stream of its own
# Each training conversation is one exchange about one of the 30 things, so every step's schema-carrying prompt pays
# for a call. Measured with the tool base below: conversations of 2 to 4 exchanges, a quarter of them chat tasks, and
# 70 more things to ask about, got 1 of 30 held-out calls exact after 600 steps; one exchange on the 30, 25.
# The 70 words stay in the vocabulary, where the first version of this demo put them: dropping them would change the
# vocabulary size, and with it the other demos' base model and measured figures.
VOCABULARY_ONLY_THINGS = (
    "table chair lamp door window wall roof floor bottle cup plate bowl knife fork pencil paper book bag box hat "
    "shoe shirt coat sock glove ring key lock clock watch phone radio camera bicycle car truck boat train plane "
    "rocket balloon kite drum guitar piano flute bell candle rope flag tent bridge tower castle garden fence road "
    "stone brick sand leaf tree flower rose tulip daisy feather shell pearl button ribbon"
).split()


def tool_call_text(thing: str) -> str:
    """The call as Llama 3.2's template writes it: what the demo's held-out prompts should get back, exactly."""
    return json.dumps({"name": "lookup_color", "parameters": {"thing": thing}})


def _tool_round(rng: random.Random, question: str, thing: str, color: str, number: int) -> list[dict]:
    """A color question, the lookup_color call, its result and the answer built from it."""
    arguments = {"thing": thing}
    call = {"id": f"call_{number}", "type": "function", "function": {"name": "lookup_color", "arguments": arguments}}
    if rng.random() < 0.5:
        call["function"]["arguments"] = json.dumps(arguments)
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": color},
        {"role": "assistant", "content": f"The {thing} is {color}."},
    ]


def build_tool_dataset(seed: int = TOOL_SEED) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows ``{"messages"}``; held-out rows also carry ``question`` and the expected ``call``
    (evals/tiny_qa/tiny_tool_call.yaml). Training asks the color demo's 150 training questions, held-out its 30
    held-out wordings: every held-out thing is asked in training, never in the held-out wording."""
    train_questions, heldout = build_dataset()
    rng = random.Random(seed)
    questions = sorted({(e["instruction"], e["output"].split(" ")[1]) for e in train_questions})
    train = []
    for n in range(N_TOOL_TRAIN):
        question, thing = rng.choice(questions)
        train.append({"messages": _tool_round(rng, question, thing, THING_COLORS[thing], n)})
    held = []
    for n, e in enumerate(heldout):
        thing = e["output"].split(" ")[1]
        messages = _tool_round(rng, e["instruction"], thing, THING_COLORS[thing], N_TOOL_TRAIN + n)
        held.append({"messages": messages, "question": e["instruction"], "call": tool_call_text(thing)})
    return train, held


def _tool_texts(conversations: list[dict]) -> list[str]:
    """The demo's tool conversations as Llama 3.2's template writes them (schemas in the user message, and in the
    system block), without the special tokens: text for the vocabulary."""
    from lora_tools.data import records
    from lora_tools.data.chat_template import render_template

    texts = []
    for i, c in enumerate(conversations):
        messages = records.conversation("demo", c, "messages", "dataset")
        variables = {"bos_token": "", "date_string": "26 Jul 2024", "tools_in_user_message": i % 2 == 0}
        text = render_template(CHAT_TEMPLATE, messages, False, variables, TOOLS)
        texts += [t for t in re.split(r"<\|[a-z_]+\|>", text) if t]
    return texts


# --- the tokenizer -------------------------------------------------------------------------------------

# Text the real pipeline wraps around each sample (torchtune's alpaca prompt and Llama 3 chat headers), so
# that common words become single tokens rather than bytes.
_TEMPLATE_TEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n\n\n### Input:\n\n\n"
    "### Response:\n system user assistant ipython The quick brown fox jumps over the lazy dog."
)


def build_bpe_ranks(texts: list[str], ranks: dict[bytes, int] | None = None) -> dict[bytes, int]:
    """A byte-level BPE vocabulary: all 256 bytes, then every prefix of every pre-tokenised piece.

    tiktoken merges adjacent parts whose concatenation has a rank, so keeping each piece's prefixes makes
    every piece reachable by merges; sorting by (length, bytes) makes the file deterministic. Given ``ranks``, the
    new pieces follow them, and every token of ``ranks`` keeps its id.
    """
    pieces = set()
    for text in texts:
        pieces.update(p.encode() for p in regex.findall(CL100K_PATTERN, text))
    ranks = dict(ranks) if ranks else {bytes([b]): b for b in range(256)}
    merged = {p[:n] for p in pieces for n in range(2, len(p) + 1)} - set(ranks)
    for token in sorted(merged, key=lambda t: (len(t), t)):
        ranks[token] = len(ranks)
    return ranks


def special_tokens(base_vocab: int) -> dict[str, int]:
    """Llama 3's 256 special tokens, same names and order, numbered to follow our base vocabulary (Llama 3's
    start at 128000; its <|image|> sits at 128256, here in the slot it would otherwise leave empty)."""
    names = LLAMA3_FIRST_SPECIAL_TOKENS + [f"<|reserved_special_token_{i}|>" for i in range(2, 245)]
    return {name: base_vocab + i for i, name in enumerate(names)}


# --- the same tokenizer in Hugging Face's format -------------------------------------------------------

BOS_TOKEN, EOS_TOKEN = "<|begin_of_text|>", "<|eot_id|>"  # as Llama 3.2 Instruct's tokenizer_config.json

# Llama 3.2 Instruct's chat template, as Meta publishes it in the model's tokenizer_config.json (byte for byte, as
# llama.cpp keeps it under models/templates/): the system block with knowledge cutoff and date, tool schemas in the
# first user message (or, with tools_in_user_message=False, in the system block), a tool call written as
# {"name": ..., "parameters": ...}, results under the ipython header.
CHAT_TEMPLATE = (Path(__file__).parent / "llama3_2_instruct.jinja").read_text(encoding="utf-8")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as one printable character, so a token's bytes become a string.

    Bytes that are printable Latin-1 characters (other than space and the soft hyphen) stand for themselves;
    the other 68 bytes take the characters 256, 257, ... in byte order (so a space is "Ġ", a newline "Ċ").
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in visible}
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + len(table) - len(visible))
    return dict(sorted(table.items()))


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Merge rules under which Hugging Face's BPE cuts text as tiktoken does with ``ranks``.

    tiktoken repeatedly joins the adjacent pair of parts whose concatenation has the lowest rank; every part is
    a token. So each token of two or more bytes gets a rule for every way to split it into two tokens, and
    rules are ordered by the joined token's rank (then by the halves' ranks, which only orders equal results).
    """
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def hf_tokenizer_json(ranks: dict[bytes, int], specials: dict[str, int]) -> dict:
    """A tokenizer.json laid out like Llama 3's: the pre-tokenisation pattern, byte-level BPE with
    ``ignore_merges`` (a piece that is a token is taken whole, as tiktoken does), the special tokens as added
    tokens, and <|begin_of_text|> put in front by the post-processor."""
    alphabet = bytes_to_unicode()

    def show(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    bos = {"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": name,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for name, i in sorted(specials.items(), key=lambda x: x[1])
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": CL100K_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "Sequence",
            "processors": [
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
                {
                    "type": "TemplateProcessing",
                    "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [
                        bos,
                        {"Sequence": {"id": "A", "type_id": 0}},
                        {"SpecialToken": {"id": BOS_TOKEN, "type_id": 1}},
                        {"Sequence": {"id": "B", "type_id": 1}},
                    ],
                    "special_tokens": {
                        BOS_TOKEN: {"id": BOS_TOKEN, "ids": [specials[BOS_TOKEN]], "tokens": [BOS_TOKEN]}
                    },
                },
            ],
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {show(token): rank for token, rank in ranks.items()},
            "merges": [f"{show(left)} {show(right)}" for left, right in bpe_merges(ranks)],
        },
    }


def write_hf_tokenizer(out: Path, ranks: dict[bytes, int], specials: dict[str, int]) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    tokenizer = hf_tokenizer_json(ranks, specials)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


# --- the model -----------------------------------------------------------------------------------------


def build_model_state(
    vocab_size: int,
    shape: dict = MODEL,
    seed: int = SEED,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    added_rows: tuple[int, int] = (0, 0),
    gain: float = INIT_GAIN,
    qk_gain: float | None = None,
) -> dict[str, torch.Tensor]:
    """Random Llama-3.2-shaped weights in torchtune's key format: normal(0, gain / sqrt(width)), norms at 1;
    the attention's q and k projections at ``qk_gain`` / sqrt(width) where given.

    ``added_rows`` (at, count): embedding rows for tokens added to the vocabulary at id ``at``, drawn after the
    rest from a stream of their own, so every other weight is what the vocabulary without them gave (the demos'
    figures were measured on that model; the tool demo's words are the added tokens)."""
    from torchtune.models.llama3_2 import llama3_2
    from torchtune.training import set_default_dtype

    at, count = added_rows
    torch.manual_seed(seed)
    with set_default_dtype(dtype), torch.device(device):
        model = llama3_2(vocab_size=vocab_size - count, tie_word_embeddings=True, **shape)
    std = gain * shape["embed_dim"] ** -0.5
    qk_std = (qk_gain or gain) * shape["embed_dim"] ** -0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # RMSNorm scales
                p.fill_(1.0)
            else:
                p.normal_(0.0, qk_std if name.endswith(("q_proj.weight", "k_proj.weight")) else std)
    state = {k: v.contiguous().cpu() for k, v in model.state_dict().items()}
    if count:
        rows = torch.randn(count, shape["embed_dim"], generator=torch.Generator().manual_seed(seed + 5)) * std
        embeddings = state["tok_embeddings.weight"]
        state["tok_embeddings.weight"] = torch.cat([embeddings[:at], rows.to(embeddings.dtype), embeddings[at:]])
    return state


def hf_config(vocab_size: int, specials: dict[str, int], shape: dict = MODEL, dtype: str = "float32") -> dict:
    head_dim = shape["embed_dim"] // shape["num_heads"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": shape["embed_dim"],
        "intermediate_size": shape["intermediate_dim"],
        "num_hidden_layers": shape["num_layers"],
        "num_attention_heads": shape["num_heads"],
        "num_key_value_heads": shape["num_kv_heads"],
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,  # as Llama 3.2; RoPE is computed, not stored
        "rms_norm_eps": shape["norm_eps"],
        "rope_theta": float(shape["rope_base"]),
        "rope_scaling": {
            "factor": float(shape["scale_factor"]),
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "torch_dtype": dtype,
        "bos_token_id": specials["<|begin_of_text|>"],
        "eos_token_id": [specials[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")],
        "pad_token_id": specials["<|finetune_right_pad_id|>"],
    }


def write_model(
    out: Path,
    vocab_size: int,
    specials: dict[str, int],
    shape: dict = MODEL,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    added_rows: tuple[int, int] = (0, 0),
    gain: float = INIT_GAIN,
    qk_gain: float | None = None,
) -> None:
    """A random model of ``shape`` as Hugging Face files: model.safetensors, config.json, generation_config.json."""
    from torchtune.models.convert_weights import tune_to_hf

    state = build_model_state(
        vocab_size, shape, device=device, dtype=dtype, added_rows=added_rows, gain=gain, qk_gain=qk_gain
    )
    head_dim = shape["embed_dim"] // shape["num_heads"]
    hf_state = tune_to_hf(state, shape["num_heads"], shape["num_kv_heads"], shape["embed_dim"], head_dim)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(vocab_size, specials, shape, dtype=str(dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps({**generation, "do_sample": False}, indent=2) + "\n")


def build(out: Path) -> dict:
    """Write every asset under ``out``; returns a small summary. Deterministic: same bytes every run."""
    train, heldout = build_dataset()
    chat_train, chat_heldout = build_chat_dataset()
    texts = [_TEMPLATE_TEXT, *SYSTEM_PROMPTS] + [v for e in train + heldout for v in e.values()]
    texts += [m["content"] for c in chat_train + chat_heldout for m in c["messages"]]
    ranks = build_bpe_ranks(texts)
    tool_train, tool_heldout = build_tool_dataset()
    tool_texts = _tool_texts(tool_train + tool_heldout) + [
        "\n".join(VOCABULARY_ONLY_THINGS),
        " " + " ".join(VOCABULARY_ONLY_THINGS),
    ]
    tool_ranks = build_bpe_ranks(tool_texts, ranks)  # after the others: they keep ids
    added_rows = (len(ranks), len(tool_ranks) - len(ranks))
    ranks = tool_ranks
    specials = special_tokens(len(ranks))
    vocab_size = len(ranks) + len(specials)

    (out / "original").mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(parents=True, exist_ok=True)
    with open(out / "original" / "tokenizer.model", "w") as f:
        for token, rank in ranks.items():
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    added = [{"id": i, "content": t, "special": True} for t, i in sorted(specials.items(), key=lambda x: x[1])]
    (out / "special_tokens.json").write_text(json.dumps({"added_tokens": added}, indent=1) + "\n")

    write_model(out, vocab_size, specials, added_rows=added_rows)

    write_hf_tokenizer(out, ranks, specials)
    tool_base = out / "tool_base"
    write_model(tool_base, vocab_size, specials, added_rows=added_rows, gain=TOOL_BASE_GAIN, qk_gain=TOOL_BASE_QK_GAIN)
    write_hf_tokenizer(tool_base, ranks, specials)

    (out / "data" / "train.json").write_text(json.dumps(train, indent=1) + "\n")
    (out / "data" / "heldout.json").write_text(json.dumps(heldout, indent=1) + "\n")
    (out / "data" / "tools.json").write_text(json.dumps(TOOLS, indent=1) + "\n")
    choices = build_choice_questions(heldout)
    (out / "data" / "heldout_choices.jsonl").write_text("".join(json.dumps(q) + "\n" for q in choices))
    pairs_train, pairs_heldout = build_preference_pairs()
    for name, rows in (
        ("chat_train.jsonl", chat_train),
        ("chat_heldout.jsonl", chat_heldout),
        ("pairs_train.jsonl", pairs_train),
        ("pairs_heldout.jsonl", pairs_heldout),
        ("tools_train.jsonl", tool_train),
        ("tools_heldout.jsonl", tool_heldout),
    ):
        (out / "data" / name).write_text("".join(json.dumps(c) + "\n" for c in rows))
    return {
        "vocab_size": vocab_size,
        "train": len(train),
        "heldout": len(heldout),
        "chat_train": len(chat_train),
        "chat_heldout": len(chat_heldout),
        "out": str(out),
    }
