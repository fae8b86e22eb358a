"""Unit tier: the per-sample label shift and the evaluation shards, on hand-made samples."""

import torch

from lora_tools.data.batching import EvalShard, NextTokenLabels

IGNORE = -100
SAMPLES = [{"tokens": [10 + i, 20 + i, 30 + i], "labels": [IGNORE, 20 + i, 30 + i]} for i in range(5)]


def test_labels_become_next_token_targets_within_each_sample():
    shifted = NextTokenLabels(SAMPLES, IGNORE)
    assert len(shifted) == 5
    assert shifted[2] == {"tokens": [12, 22, 32], "labels": [22, 32, IGNORE]}
    assert SAMPLES[2]["labels"] == [IGNORE, 22, 32]  # the wrapped dataset is untouched


def test_eval_shards_cover_every_sample_once_and_pad_with_ignored_labels():
    world = 3
    shards = [EvalShard(SAMPLES, rank, world, IGNORE) for rank in range(world)]
    assert [len(s) for s in shards] == [2, 2, 2]  # 5 samples: one share is padded to the others' length
    seen = [s[i] for s in shards for i in range(len(s))]
    trained = [x for x in seen if any(label != IGNORE for label in x["labels"])]
    assert sorted(x["tokens"][0] for x in trained) == [10, 11, 12, 13, 14]
    (filler,) = [x for x in seen if all(label == IGNORE for label in x["labels"])]
    assert filler["tokens"] == SAMPLES[0]["tokens"]  # same length as a real sample: same forward cost


def test_a_packed_filler_keeps_its_tensor_shape():
    packed = [{"tokens": torch.arange(4), "labels": torch.arange(4)}]
    filler = EvalShard(packed, rank=1, world_size=2, ignore_index=IGNORE)[0]
    assert torch.equal(filler["labels"], torch.full((4,), IGNORE))
