"""The data summary's counts: percentiles, truncation, and packing rows equal to torchtune's PackedDataset."""

import random

import pytest
from torchtune.datasets import PackedDataset

from lora_tools.data.summary import DataSummary


class _Samples:
    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return {"tokens": [1] * self.lengths[i], "labels": [1] * self.lengths[i]}


@pytest.mark.parametrize("seed", range(5))
def test_packing_rows_are_torchtunes(seed):
    rng = random.Random(seed)
    max_seq_len = 64
    lengths = [rng.randint(1, max_seq_len) for _ in range(300)]
    packed = PackedDataset(_Samples(lengths), max_seq_len=max_seq_len, padding_idx=0)
    share, rows = DataSummary(lengths, lengths, None, max_seq_len).packing_fill()
    assert rows == len(packed)
    assert share == pytest.approx(sum(lengths) / (len(packed) * max_seq_len))


def test_truncation_counts_and_percentiles():
    full = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    kept = [min(n, 64) for n in full]
    s = DataSummary(kept, [1] * 9 + [0], full, 64)
    assert (s.truncated, s.tokens_lost, s.untrained) == (4, 6 + 16 + 26 + 36, 1)
    assert (s.percentile(50), s.percentile(90), s.percentile(100)) == (50, 90, 100)
    assert "4 of 10 samples (40.0%) are longer than tokenizer.max_seq_len=64" in s.truncation_warning()
    assert DataSummary([5] * 100, [1] * 100, [5] * 99 + [65], 64).truncation_warning() is None  # 1% is not more
    # without the lengths before truncation (torchtune's builders), a sample that fills max_seq_len counts
    assert DataSummary(kept, [1] * 10, None, 64).truncated == 4
