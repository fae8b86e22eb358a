"""Weighted mixing of a list of datasets: which samples of each source one epoch holds, drawn once from the seed.

    dataset:
      - _component_: lora_tools.data.sft.conversation_dataset
        source: data/support.jsonl
        weight: 0.8
      - _component_: lora_tools.data.sft.conversation_dataset
        source: data/smalltalk.jsonl
        weight: 0.2
        max_samples: 500

``max_samples`` caps a source at a random subset of that many of its samples (its pool). Without weights an
epoch is the pools one after the other. With weights an epoch has as many samples as the pools together, and
source k gets round(share_k x epoch) of them (largest remainder, so the counts add up): drawn fewer times than
its pool holds, a random subset of the pool without repeats; drawn more, whole shuffled passes over the pool,
then a random subset for the rest, so every sample comes once before any comes twice.

The draw is a pure function of the sources' sizes, the keys and the seed (each source's numbers come from a
generator of its own, seeded from the seed and the source's place in the list): a resumed run rebuilds the
same epoch, and the training sampler shuffles it each epoch as it shuffles any dataset.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from lora_tools.config.settings import check_dataset_keys
from lora_tools.errors import UserError

DEFAULT_SEED = 0  # for commands that build the data of a config whose seed is null (training draws one)


@dataclass(frozen=True)
class Mix:
    """One epoch's draw: per source, its pool and the samples drawn from it, as indices into the source (the draw
    repeats pool samples when a weight asks for more than the pool holds)."""

    pools: tuple[torch.Tensor, ...]
    draws: tuple[torch.Tensor, ...]


def counts(shares: Sequence[float], total: int) -> list[int]:
    """round(share x total) per share, by largest remainder, so they add up to ``total`` exactly (ties: the
    earlier source)."""
    quotas = [s * total for s in shares]
    out = [int(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda k: (-(quotas[k] - out[k]), k))
    for k in by_remainder[: total - sum(out)]:
        out[k] += 1
    return out


def _generator(seed: int, source: int, purpose: str) -> torch.Generator:
    """A generator of its own for each source and purpose, so one source's keys never change another's draw."""
    digest = hashlib.sha256(f"{seed}/{source}/{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def draw(totals: Sequence[int], weights: Sequence[float] | None, max_samples: Sequence[int | None], seed: int) -> Mix:
    """The epoch of sources holding ``totals`` samples, with these weights (None: no weights) and caps."""
    pools = []
    for k, (total, cap) in enumerate(zip(totals, max_samples, strict=True)):
        if cap is None or cap >= total:
            pools.append(torch.arange(total))
        else:
            pools.append(torch.randperm(total, generator=_generator(seed, k, "pool"))[:cap].sort().values)
    if weights is None:
        return Mix(tuple(pools), tuple(pools))
    shares = tuple(w / sum(weights) for w in weights)
    draws = []
    for k, (pool, n) in enumerate(zip(pools, counts(shares, sum(len(p) for p in pools)), strict=True)):
        g = _generator(seed, k, "draw")
        passes, rest = divmod(n, len(pool)) if len(pool) else (0, 0)
        picks = [pool[torch.randperm(len(pool), generator=g)] for _ in range(passes)]
        picks.append(pool[torch.randperm(len(pool), generator=g)[:rest]])
        draws.append(torch.cat(picks))
    return Mix(tuple(pools), tuple(draws))


class MixedDataset(Dataset):
    """Samples of several datasets by an index map: sample i is ``parts[source[i]][index[i]]``."""

    def __init__(self, parts: Sequence[Dataset], draws: Sequence[torch.Tensor]):
        self.parts = list(parts)
        self.source = torch.cat([torch.full((len(d),), k, dtype=torch.long) for k, d in enumerate(draws)])
        self.index = torch.cat([d.long() for d in draws])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.parts[int(self.source[i])][int(self.index[i])]


def read_keys(sections: list, name: str) -> tuple[list[float] | None, list[int | None]]:
    """Pop ``weight`` and ``max_samples`` from each section (builders never see them): (weights, or None when no
    section has one; each section's max_samples), checked as lora_tools.config.settings checks a config."""
    check_dataset_keys(sections, name)  # again here, for callers that did not parse the config
    weights = [s.pop("weight", None) for s in sections]
    caps = [s.pop("max_samples", None) for s in sections]
    return (None if weights[0] is None else [float(w) for w in weights]), caps


def check_sources(totals: Sequence[int], weights: list[float] | None, name: str) -> None:
    """A weighted source must have samples to draw from."""
    for k, total in enumerate(totals):
        if weights is not None and total == 0:
            where = f"{name}[{k}]" if len(totals) > 1 else name
            raise UserError(f"{where} has no samples but a weight; add samples to it or remove it from the list")
