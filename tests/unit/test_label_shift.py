"""Which (input token, label) pairs a packed batch trains on: torchtune's shift of the whole packed row against
this project's shift of each sample before packing (lora_tools.batching.build_dataset).

torchtune 0.6.1 packs the unshifted samples and its recipe shifts each packed row,
``labels = torch.hstack((labels[..., 1:], ignore_index column))``, so the last token of one sample is paired
with the first label of the next sample in the row. The Llama 3 tokenizer masks BOS (and the final EOS) in the
labels of instruction and chat samples, so that pair is ignored and the two orders train on the same pairs.
Text completion samples keep BOS as a real label: there torchtune trains one extra pair per sample boundary
inside a row (the last token of a sample predicting the next sample's BOS).
"""

import json
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf
from torchtune.datasets import PackedDataset, alpaca_dataset, chat_dataset, text_completion_dataset
from torchtune.models.llama3 import llama3_tokenizer

from lora_tools.data.batching import build_dataset

IGNORE = -100
MAX_SEQ_LEN = 256
TRAIN = "assets/tiny/data/train.json"
SPLIT = "train[:300]"


@pytest.fixture(scope="module")
def tokenizer():
    return llama3_tokenizer(
        path="assets/tiny/original/tokenizer.model",
        special_tokens_path="assets/tiny/special_tokens.json",
        max_seq_len=MAX_SEQ_LEN,
    )


def torchtune_pairs(packed: PackedDataset) -> Counter:
    """torchtune's order: pack the samples as they are, then shift each packed row as its recipe does."""
    out = Counter()
    for row in packed:
        tokens, labels = row["tokens"], row["labels"]
        shifted = torch.hstack((labels[1:], torch.tensor([IGNORE])))
        keep = shifted != IGNORE
        out.update(zip(tokens[keep].tolist(), shifted[keep].tolist(), strict=True))
    return out


def our_pairs(packed: PackedDataset) -> Counter:
    """This project's order: labels were shifted per sample before packing; each label is used as it is."""
    out = Counter()
    for row in packed:
        keep = row["labels"] != IGNORE
        out.update(zip(row["tokens"][keep].tolist(), row["labels"][keep].tolist(), strict=True))
    return out


def ours(tokenizer, **dataset_cfg) -> PackedDataset:
    built = build_dataset(OmegaConf.create({**dataset_cfg, "packed": True}), tokenizer, IGNORE)
    assert built.packed and isinstance(built.dataset, PackedDataset)
    return built.dataset


@pytest.mark.parametrize("train_on_input", [True, False])
def test_alpaca_packed_rows_train_on_the_same_pairs_both_ways(tokenizer, train_on_input):
    theirs = alpaca_dataset(
        tokenizer, source="json", data_files=TRAIN, split=SPLIT, train_on_input=train_on_input, packed=True
    )
    mine = ours(
        tokenizer,
        _component_="torchtune.datasets.alpaca_dataset",
        source="json",
        data_files=TRAIN,
        split=SPLIT,
        train_on_input=train_on_input,
    )
    assert len(theirs) == len(mine) < 300  # the same rows, several samples in each
    # Why they agree: every sample's first label (BOS) is masked, so no pair crosses a boundary either way.
    unpacked = alpaca_dataset(tokenizer, source="json", data_files=TRAIN, split=SPLIT, train_on_input=train_on_input)
    assert all(sample["labels"][0] == IGNORE and sample["tokens"][0] == tokenizer.bos_id for sample in unpacked)
    pairs = torchtune_pairs(theirs)
    assert sum(pairs.values()) > 0
    assert pairs == our_pairs(mine)
    # torchtune's recipe counts its tokens/s from the labels before its shift: the same number of trained pairs.
    assert sum(int((row["labels"] != IGNORE).sum()) for row in theirs) == sum(pairs.values())


def test_chat_packed_rows_train_on_the_same_pairs_both_ways(tokenizer, tmp_path):
    with open(TRAIN) as f:
        rows = json.load(f)[:200]
    chats = tmp_path / "chats.json"
    messages = [
        [
            {"role": "user", "content": f"{r['instruction']} {r['input']}".strip()},
            {"role": "assistant", "content": r["output"]},
        ]
        for r in rows
    ]
    chats.write_text(json.dumps([{"messages": m} for m in messages]))
    common = dict(source="json", data_files=str(chats), split="train", conversation_column="messages")
    common |= dict(conversation_style="openai", train_on_input=False)
    theirs = chat_dataset(tokenizer, packed=True, **common)
    mine = ours(tokenizer, _component_="torchtune.datasets.chat_dataset", **common)
    assert len(theirs) == len(mine) < len(messages)
    pairs = torchtune_pairs(theirs)
    assert sum(pairs.values()) > 0
    assert pairs == our_pairs(mine)


def test_text_completion_torchtune_adds_one_pair_per_boundary_inside_a_row(tokenizer, tmp_path):
    with open(TRAIN) as f:
        rows = json.load(f)[:120]
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps([{"text": f"{r['instruction']} {r['input']} {r['output']}".strip()} for r in rows]))
    common = dict(source="json", data_files=str(texts), split="train", column="text")
    # split_across_pack=False is how build_dataset packs; it gives both orders the same rows.
    theirs = text_completion_dataset(tokenizer, packed=True, split_across_pack=False, **common)
    mine = ours(tokenizer, _component_="torchtune.datasets.text_completion_dataset", **common)
    n_samples = len(text_completion_dataset(tokenizer, **common))
    assert len(theirs) == len(mine) and 1 < len(mine) < n_samples

    # Text completion keeps BOS as a real label ...
    assert all(sample["labels"][0] == tokenizer.bos_id for sample in text_completion_dataset(tokenizer, **common))
    theirs_pairs, our_pairs_ = torchtune_pairs(theirs), our_pairs(mine)
    # ... so torchtune trains everything this project does, plus the pairs across sample boundaries:
    extra = theirs_pairs - our_pairs_
    assert not our_pairs_ - theirs_pairs
    # every sample fits in a row and none is split, so the boundaries inside rows are samples minus rows
    boundaries = n_samples - len(mine)
    assert boundaries > 0
    assert sum(extra.values()) == boundaries
    # each one is the end of a sample (EOS, as add_eos=True) trained to predict the next sample's BOS
    assert extra == Counter({(tokenizer.eos_id, tokenizer.bos_id): boundaries})
