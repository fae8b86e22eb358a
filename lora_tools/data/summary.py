"""What a dataset gives the model: sample lengths, truncation, trained tokens, packing.

The same summary is printed by ``python -m lora_tools.data`` and logged by the recipes at start-up, so a
max_seq_len that cuts answers off shows before training rather than in a worse model.
"""

import math
from dataclasses import dataclass

from torchtune import utils

from lora_tools.errors import UserError

log = utils.get_logger("INFO")

TRUNCATION_WARNING_SHARE = 0.01  # the recipes warn when more than this share of samples is truncated


@dataclass(frozen=True)
class SourceCounts:
    """One dataset of a list, each as (samples, tokens): in its file, in its pool (the file, or max_samples of
    it), and drawn into one epoch (lora_tools.data.mixing)."""

    name: str  # what it reads
    file: tuple[int, int]
    pool: tuple[int, int]
    drawn: tuple[int, int]

    def line(self, where: str, epoch: int) -> str:
        (file_n, file_t), (pool_n, pool_t), (drawn_n, drawn_t) = self.file, self.pool, self.drawn
        cut = f" (max_samples of its {file_n} samples, {file_t:,} tokens)" if pool_n < file_n else ""
        share = 100 * drawn_n / epoch if epoch else 0.0
        times = f"×{drawn_n / pool_n:.2f}" if pool_n else "×0"
        return (
            f"{where} {self.name}: configured {pool_n} samples, {pool_t:,} tokens{cut}; drawn {drawn_n} samples, "
            f"{drawn_t:,} tokens, {share:.1f}% of the epoch, {times}"
        )


@dataclass(frozen=True)
class DataSummary:
    """Per-sample counts. ``full_lengths`` is None where the dataset only has the truncated samples (torchtune's
    builders truncate while tokenizing); then a sample that fills max_seq_len counts as truncated."""

    lengths: list[int]
    trained: list[int]
    full_lengths: list[int] | None
    max_seq_len: int | None
    packed_rows: int | None = None  # the rows packing made, when the dataset is packed
    sources: tuple[SourceCounts, ...] = ()  # a list of datasets (or one with max_samples): each one's counts

    @property
    def samples(self) -> int:
        return len(self.lengths)

    @property
    def truncated(self) -> int:
        if self.max_seq_len is None:
            return 0
        if self.full_lengths is None:
            return sum(n >= self.max_seq_len for n in self.lengths)
        return sum(n > self.max_seq_len for n in self.full_lengths)

    @property
    def tokens_lost(self) -> int | None:
        if self.full_lengths is None:
            return None
        return sum(full - kept for full, kept in zip(self.full_lengths, self.lengths, strict=True))

    @property
    def truncated_share(self) -> float:
        return self.truncated / self.samples if self.samples else 0.0

    @property
    def untrained(self) -> int:
        return sum(n == 0 for n in self.trained)

    def packing_fill(self) -> tuple[float, int] | None:
        """(share of row positions holding a token, rows): the packed rows, or those packing would make,
        filling each row greedily in order as torchtune's PackedDataset does."""
        if self.max_seq_len is None or not self.lengths:
            return None
        rows = self.packed_rows
        if rows is None:
            rows, used = 1, 0
            for n in self.lengths:
                if used + n > self.max_seq_len:
                    rows, used = rows + 1, 0
                used += n
        return sum(self.lengths) / (rows * self.max_seq_len), rows

    def percentile(self, p: float) -> int:
        """Sample length (before truncation where known) at percentile ``p``, nearest-rank."""
        lengths = sorted(self.full_lengths if self.full_lengths is not None else self.lengths)
        return lengths[max(0, min(len(lengths) - 1, math.ceil(p / 100 * len(lengths)) - 1))]

    def lines(self, name: str = "dataset") -> list[str]:
        if not self.lengths:
            return [f"{name}: no samples"]
        pct = self.percentile
        out = [
            f"{name}: {self.samples} samples, {sum(self.lengths):,} tokens, {sum(self.trained):,} of them trained; "
            f"tokens per sample p50 {pct(50)}, p90 {pct(90)}, p99 {pct(99)}, max {pct(100)}"
        ]
        for k, source in enumerate(self.sources):
            out.append(source.line(f"{name}[{k}]" if len(self.sources) > 1 else name, self.samples))
        if self.max_seq_len is not None and self.full_lengths is not None:
            out.append(
                f"{name}: truncated at tokenizer.max_seq_len {self.max_seq_len}: {self.truncated} samples "
                f"({100 * self.truncated_share:.1f}%), {self.tokens_lost:,} tokens cut"
            )
        elif self.max_seq_len is not None:  # the builder truncated while tokenizing: what was cut is unknown
            out.append(
                f"{name}: samples that fill tokenizer.max_seq_len {self.max_seq_len} (so may be truncated): "
                f"{self.truncated} ({100 * self.truncated_share:.1f}%)"
            )
        out.append(f"{name}: samples with no trained token: {self.untrained}")
        fill = self.packing_fill()
        if fill is not None:
            share, rows = fill
            how = "packed" if self.packed_rows is not None else "packed: True would make"
            out.append(f"{name}: {how} {rows} rows of {self.max_seq_len} tokens, {100 * share:.1f}% filled")
        return out

    def truncation_warning(self, name: str = "dataset") -> str | None:
        if self.truncated_share <= TRUNCATION_WARNING_SHARE:
            return None
        hint = f" (p99 length: {self.percentile(99)})" if self.full_lengths is not None else ""
        return (
            f"{name}: {self.truncated} of {self.samples} samples ({100 * self.truncated_share:.1f}%) are longer than "
            f"tokenizer.max_seq_len={self.max_seq_len} and are cut; raise tokenizer.max_seq_len{hint} or shorten "
            "those samples"
        )

    def require_trained_tokens(self, name: str = "dataset") -> None:
        """Refuse training data in which no sample keeps a token to train on (all cut before their answer)."""
        if self.samples and not any(self.trained):
            cut = f", {self.truncated} cut at tokenizer.max_seq_len={self.max_seq_len}" if self.truncated else ""
            raise UserError(
                f"no sample of {name} keeps a token to train on ({self.samples} samples{cut}); raise "
                "tokenizer.max_seq_len or shorten the prompts so the answers fit"
            )

    def log(self, name: str = "dataset") -> None:
        """The summary as INFO lines, and the truncation warning (once) where it applies."""
        for line in self.lines(name):
            log.info(line)
        if warning := self.truncation_warning(name):
            log.warning(warning)
