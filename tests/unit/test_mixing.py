"""Weighted dataset mixing (lora_tools.data.mixing) through build_dataset, with the tiny model's real tokenizer:
two conversation files of 300 and 60 rows, told apart by their samples' tokens."""

import json

import pytest
from conftest import REPO
from omegaconf import OmegaConf
from torchtune import config
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from lora_tools.data import mixing
from lora_tools.data.batching import build_dataset
from lora_tools.errors import UserError

CHAT = OmegaConf.load(REPO / "configs" / "tiny_chat.yaml")
SIZES = (300, 60)


@pytest.fixture(scope="module")
def tokenizer():
    return config.instantiate(CHAT.tokenizer)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two JSONL files of distinct conversations from the tiny chat data: 300 rows and the next 60."""
    folder = tmp_path_factory.mktemp("mix")
    lines = list(dict.fromkeys((REPO / "assets/tiny/data/chat_train.jsonl").read_text().splitlines()))
    paths = [folder / "big.jsonl", folder / "small.jsonl"]
    paths[0].write_text("\n".join(lines[: SIZES[0]]) + "\n")
    paths[1].write_text("\n".join(lines[SIZES[0] : sum(SIZES)]) + "\n")
    assert all(json.loads(line)["messages"] for line in lines[: sum(SIZES)])
    return paths


def sections(files, *keys: dict) -> OmegaConf:
    """tiny_chat.yaml's dataset section for each file, with its mixing keys."""
    base = OmegaConf.to_container(CHAT, resolve=True)["dataset"]
    return OmegaConf.create([{**base, "source": str(path), **k} for path, k in zip(files, keys, strict=True)])


def origins(built, tokenizer, files) -> list[tuple[int, int]]:
    """(file, row) of each sample of an epoch, found by its tokens in each file read alone."""
    where = {}
    for k, path in enumerate(files):
        alone = build_dataset(sections([path], {}), tokenizer, CROSS_ENTROPY_IGNORE_IDX)
        for row in range(len(alone.samples)):
            where[tuple(alone.samples[row]["tokens"])] = (k, row)
    assert len(where) == sum(SIZES)  # every row's tokens tell it apart
    return [where[tuple(built.dataset[i]["tokens"])] for i in range(len(built.dataset))]


def test_weights_set_each_sources_share_of_an_epoch(tokenizer, files):
    weighted = sections(files, {"weight": 0.8}, {"weight": 0.2})
    built = build_dataset(weighted, tokenizer, CROSS_ENTROPY_IGNORE_IDX, seed=3)
    drawn = origins(built, tokenizer, files)
    assert len(drawn) == sum(SIZES)  # weights do not change the epoch's length
    shares = [sum(k == source for k, _ in drawn) / len(drawn) for source in (0, 1)]
    assert abs(shares[0] - 0.8) <= 0.02 and abs(shares[1] - 0.2) <= 0.02, shares
    assert [sum(k == source for k, _ in drawn) for source in (0, 1)] == [288, 72]  # exact: 0.8 x 360, 0.2 x 360
    big = [row for k, row in drawn if k == 0]
    assert len(set(big)) == len(big) == 288  # drawn fewer times than it has rows: each row at most once
    small = [row for k, row in drawn if k == 1]
    assert set(small) == set(range(60)) and max(small.count(r) for r in small) == 2  # every row once before twice

    again = build_dataset(weighted, tokenizer, CROSS_ENTROPY_IGNORE_IDX, seed=3)
    other = build_dataset(weighted, tokenizer, CROSS_ENTROPY_IGNORE_IDX, seed=4)
    assert origins(again, tokenizer, files) == drawn
    assert sorted(origins(other, tokenizer, files)) != sorted(drawn)

    lines = built.summary.lines()
    assert lines[0].startswith("dataset: 360 samples")
    tokens = [sum(len(built.dataset[i]["tokens"]) for i, (k, _) in enumerate(drawn) if k == s) for s in (0, 1)]
    assert f"dataset[0] {files[0]}: configured 300 samples" in lines[1]
    assert f"; drawn 288 samples, {tokens[0]:,} tokens, 80.0% of the epoch, ×0.96" in lines[1]
    assert f"dataset[1] {files[1]}: configured 60 samples" in lines[2]
    assert f"; drawn 72 samples, {tokens[1]:,} tokens, 20.0% of the epoch, ×1.20" in lines[2]


def test_max_samples_caps_a_sources_pool(tokenizer, files):
    capped = sections(files, {"max_samples": 100}, {})
    built = build_dataset(capped, tokenizer, CROSS_ENTROPY_IGNORE_IDX, seed=3)
    drawn = origins(built, tokenizer, files)
    big = [row for k, row in drawn if k == 0]
    assert len(drawn) == 160 and len(set(big)) == len(big) == 100  # without weights: the pools, each row once
    assert big != list(range(100))  # a random subset, not the file's first rows
    assert "dataset[0]" in built.summary.lines()[1] and "configured 100 samples" in built.summary.lines()[1]
    assert "(max_samples of its 300 samples" in built.summary.lines()[1]

    # With weights, the epoch is the pools together (160) and the capped source repeats its pool: 128 of 100.
    weighted = build_dataset(
        sections(files, {"max_samples": 100, "weight": 4}, {"weight": 1}), tokenizer, CROSS_ENTROPY_IGNORE_IDX, seed=3
    )
    drawn = origins(weighted, tokenizer, files)
    big = [row for k, row in drawn if k == 0]
    assert len(drawn) == 160 and len(big) == 128
    assert set(big) == {row for k, row in origins(built, tokenizer, files) if k == 0}  # the same pool, all of it
    assert "×1.28" in weighted.summary.lines()[1]

    # One dataset, not in a list: max_samples caps it too (and a weight means a share of 1).
    alone = build_dataset(sections(files[:1], {"max_samples": 50, "weight": 2}), tokenizer, CROSS_ENTROPY_IGNORE_IDX)
    assert len(alone.dataset) == 50 and len({tuple(alone.dataset[i]["tokens"]) for i in range(50)}) == 50
    assert alone.summary.lines()[1].startswith(f"dataset {files[0]}: configured 50 samples")


def test_packing_works_on_a_mix(tokenizer, files):
    keys = ({"weight": 0.8, "packed": True}, {"weight": 0.2, "packed": True})
    built = build_dataset(sections(files, *keys), tokenizer, CROSS_ENTROPY_IGNORE_IDX, seed=3)
    assert built.packed and len(built.samples) == 360
    real = sum(int((row["labels"] != CROSS_ENTROPY_IGNORE_IDX).sum()) for row in built.dataset)
    trained = sum(built.summary.trained)  # the mix's trained tokens, repeats included, all in the packed rows
    assert real == trained > 0


def test_counts_add_up_by_largest_remainder():
    assert mixing.counts([0.8, 0.2], 360) == [288, 72]
    assert mixing.counts([1 / 3, 1 / 3, 1 / 3], 10) == [4, 3, 3]
    assert mixing.counts([0.5, 0.25, 0.25], 7) == [3, 2, 2]  # remainders .5, .75, .75


@pytest.mark.parametrize(
    "keys, words",
    [
        (({"weight": 1}, {}), "dataset[1] has no weight but dataset[0] has one; give every section a weight, or none"),
        (({"weight": 0}, {"weight": 1}), "dataset[0].weight is 0, but it must be a number greater than 0"),
        (({"weight": 1}, {"weight": "abc"}), "dataset[1].weight is 'abc'"),
        (({"max_samples": 0}, {}), "dataset[0].max_samples is 0, but it must be an integer >= 1"),
        (({"max_samples": 2.5}, {}), "dataset[0].max_samples is 2.5"),
    ],
)
def test_bad_keys_are_one_line(tokenizer, files, keys, words):
    with pytest.raises(UserError) as e:
        build_dataset(sections(files, *keys), tokenizer, CROSS_ENTROPY_IGNORE_IDX)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_the_data_command_prints_the_draw_of_seed_0_when_seed_is_null(tokenizer, files, capsys):
    from lora_tools.data.__main__ import main

    keys = ({"weight": 0.8, "max_samples": 200}, {"weight": 0.2})
    listed = json.dumps(OmegaConf.to_container(sections(files, *keys)))
    assert main(["--config", "configs/tiny_chat.yaml", "--show", "0", f"dataset={listed}", "seed=null"]) == 0
    printed = capsys.readouterr().out.splitlines()
    want = build_dataset(sections(files, *keys), tokenizer, CROSS_ENTROPY_IGNORE_IDX, seed=0).summary.lines()
    other = build_dataset(sections(files, *keys), tokenizer, CROSS_ENTROPY_IGNORE_IDX, seed=1).summary.lines()
    assert want[1] != other[1]  # the drawn tokens tell the seeds apart
    assert printed[1 : 1 + len(want)] == want and want[1].startswith(f"dataset[0] {files[0]}: configured 200")


def test_the_example_in_docs_data_md_builds(tokenizer, files):
    """docs/data.md's weighted list, on the two files here: the keys it shows parse, and give the shares it says."""
    import re

    import yaml

    page = (REPO / "docs" / "data.md").read_text(encoding="utf-8")
    section = page.split("## Several datasets: weights and caps", 1)[1]
    example = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))["dataset"]
    assert [(s["weight"], s.get("max_samples")) for s in example] == [(0.8, None), (0.2, 500)]
    for entry, path in zip(example, files, strict=True):
        entry.update(source=str(path), chat_template=str(REPO / "assets" / "tiny"))
    built = build_dataset(OmegaConf.create(example), tokenizer, CROSS_ENTROPY_IGNORE_IDX)
    assert [len(d) for d in built.mix.draws] == [288, 72]  # 500 is more than the 60 rows: that pool is all of them
