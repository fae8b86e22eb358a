"""Datasets and batches for the recipes.

Labels are shifted to next-token targets per sample, before packing; torchtune's recipe shifts the whole packed
row after. With torchtune's Llama 3 tokenizer each sample's first label (BOS) is masked, so on alpaca and chat
data both ways train on the same (token, label) pairs. They differ where a sample's first label is a real
token (text completion): there the whole-row shift also trains each packed sample's last token to predict the
next sample's first, and the per-sample shift does not (tests/unit/test_label_shift.py shows both cases).
Shifted labels also let the loss take the labels as they come, packed or not.
"""

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import ConcatDataset, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config
from torchtune.data import padded_collate_packed
from torchtune.datasets import PackedDataset

from lora_tools.config.settings import as_list
from lora_tools.data import mixing
from lora_tools.data.sft import TokenizedConversations
from lora_tools.data.summary import DataSummary, SourceCounts
from lora_tools.errors import UserError


class NextTokenLabels(Dataset):
    """Wrap a tokenized dataset so ``labels[i]`` is the target for ``tokens[i]`` (the next token)."""

    def __init__(self, ds: Dataset, ignore_index: int):
        self._ds = ds
        self._ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self._ds[index])
        labels = list(sample["labels"])
        sample["labels"] = labels[1:] + [self._ignore_index]
        return sample


class EvalShard(Dataset):
    """One process's share of an evaluation set: samples ``rank, rank + world_size, ...``.

    Shares differ by at most one sample; the shorter ones end with a copy of sample 0 whose labels are all
    ignored, so every process runs the same number of forward passes (FSDP needs all of them in each one) and
    the summed loss and token count are those of the whole set, each sample once.
    """

    def __init__(self, ds: Dataset, rank: int, world_size: int, ignore_index: int):
        self._ds, self._rank, self._world_size, self._ignore_index = ds, rank, world_size, ignore_index

    def __len__(self) -> int:
        return -(-len(self._ds) // self._world_size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        position = index * self._world_size + self._rank
        if position < len(self._ds):
            return self._ds[position]
        filler = dict(self._ds[0])
        for key in [k for k in filler if k.endswith("labels")]:  # labels; a pair's chosen_ and rejected_labels
            labels = filler[key]  # a list, or a tensor when packed
            if torch.is_tensor(labels):
                filler[key] = torch.full_like(labels, self._ignore_index)
            else:
                filler[key] = [self._ignore_index] * len(labels)
        return filler


class ShiftedPairs(Dataset):
    """Preference pairs (lora_tools.data.preference) with next-token labels on both sequences, each pair's
    index, and, once the recipe has computed them (DPO's precompute_reference), the reference model's summed
    log-probs of its chosen and rejected responses: ``reference`` is a [pairs, 2] tensor."""

    def __init__(self, ds: Dataset, ignore_index: int):
        self._ds, self._ignore_index = ds, ignore_index
        self.reference: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self._ds[index]
        out = {"index": index}
        for side in ("chosen", "rejected"):
            out[f"{side}_tokens"] = list(pair[f"{side}_tokens"])
            out[f"{side}_labels"] = list(pair[f"{side}_labels"])[1:] + [self._ignore_index]
        if self.reference is not None:
            out["reference_logps"] = self.reference[index]
        return out


def collate_pairs(pairs: list[dict[str, Any]], padding_idx: int, ignore_idx: int) -> dict[str, torch.Tensor]:
    """b pairs as one batch of 2b rows, padded on the right: the chosen sequences, then the rejected ones.
    ``lengths``: each row's real tokens; ``index``: each pair's; ``reference_logps`` [2b] when precomputed."""
    rows = [p["chosen_tokens"] for p in pairs] + [p["rejected_tokens"] for p in pairs]
    labels = [p["chosen_labels"] for p in pairs] + [p["rejected_labels"] for p in pairs]
    width = max(len(r) for r in rows)
    batch = {
        "tokens": torch.tensor([r + [padding_idx] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([x + [ignore_idx] * (width - len(x)) for x in labels]),
        "lengths": torch.tensor([len(r) for r in rows]),
        "index": torch.tensor([p["index"] for p in pairs]),
    }
    if "reference_logps" in pairs[0]:
        reference = torch.stack([p["reference_logps"] for p in pairs])  # [b, 2]
        batch["reference_logps"] = torch.cat([reference[:, 0], reference[:, 1]])
    return batch


@dataclass
class BuiltDataset:
    dataset: Dataset  # what the recipe batches: samples with shifted labels, packed if asked
    packed: bool
    samples: Dataset  # the samples with shifted labels, before packing
    parts: list[Dataset]  # each builder's dataset, as built
    max_seq_len: int | None
    ignore_index: int
    pairs: bool = False  # preference pairs (ShiftedPairs), for DPO and ORPO
    mix: mixing.Mix | None = None  # the epoch's draw, when a section sets weight or max_samples
    names: list[str] = field(default_factory=list)  # what each section reads (source_name)

    @cached_property
    def summary(self) -> DataSummary:
        """Counted over every sample of an epoch on first use (one tokenizing pass for torchtune's builders, whose
        samples are tokenized on access), repeats as often as they are drawn. Every process counts the training
        data, at the same time, to check that it keeps a token to train on; only the first one logs it."""
        if self.pairs:
            return self.parts[0].summary()
        lengths, trained, full_lengths, sources = [], [], [], []
        for k, part in enumerate(self.parts):
            if isinstance(part, TokenizedConversations):  # counted while tokenizing
                n, t, full = part.lengths(), part.trained_counts(), part.full_lengths
            else:
                shifted = NextTokenLabels(part, self.ignore_index)
                labels = [shifted[i]["labels"] for i in range(len(part))]
                n, t, full = [len(x) for x in labels], [sum(y != self.ignore_index for y in x) for x in labels], None
            pool = self.mix.pools[k].tolist() if self.mix else range(len(part))
            drawn = self.mix.draws[k].tolist() if self.mix else range(len(part))
            lengths += [n[i] for i in drawn]
            trained += [t[i] for i in drawn]
            full_lengths = None if full is None or full_lengths is None else full_lengths + [full[i] for i in drawn]
            counted = [(len(x), sum(n[i] for i in x)) for x in (range(len(part)), pool, drawn)]
            sources.append(SourceCounts(self.names[k] if self.names else "", *counted))
        rows = len(self.dataset) if self.packed else None
        shown = len(self.parts) > 1 or self.mix is not None  # one dataset read whole: the overall lines say it all
        return DataSummary(lengths, trained, full_lengths, self.max_seq_len, rows, tuple(sources) if shown else ())


def build_dataset(
    cfg_dataset: DictConfig | ListConfig,
    tokenizer,
    ignore_index: int,
    section: str = "dataset",
    seed: int = mixing.DEFAULT_SEED,
) -> BuiltDataset:
    """Instantiate one dataset or a list of them, shift labels per sample, mix them, then pack if asked.

    ``packed``, ``weight`` and ``max_samples`` are read from the config but never passed to the builder: packing
    happens here, after the shift; weights and caps pick each epoch's samples (lora_tools.data.mixing), drawn
    once from ``seed``.
    """
    cfgs = [OmegaConf.to_container(cfg, resolve=True) for cfg in as_list(cfg_dataset)]
    weights, caps = mixing.read_keys(cfgs, section)
    built, packed_flags = [], []
    for cfg in map(OmegaConf.create, cfgs):
        packed_flags.append(bool(cfg.pop("packed", False)))
        try:
            built.append(config.instantiate(cfg, tokenizer))
        except UserError as e:  # builders name their keys as dataset.<key>; say which section they are in
            where = f"{section}[{len(built)}]" if len(cfgs) > 1 else section
            raise UserError(re.sub(r"\bdataset\.", f"{where}.", str(e))) from None
    if len(set(packed_flags)) > 1:
        raise UserError("dataset: either every dataset in the list sets packed: True or none does")
    pairs = [hasattr(b, "summary") and callable(b.summary) for b in built]  # lora_tools.data.preference
    if any(pairs):
        if len(built) > 1:
            raise UserError(f"{section}: a preference dataset must be the only one in its section; give one file")
        if packed_flags[0]:
            raise UserError(f"{section}.packed: preference pairs are not packed; remove packed: True")
        if weights is not None or caps[0] is not None:
            key = "weight" if weights is not None else "max_samples"
            raise UserError(f"{section}.{key}: preference pairs are read whole; remove {section}.{key}")
        ds = ShiftedPairs(built[0], ignore_index)
        return BuiltDataset(ds, False, ds, built, tokenizer.max_seq_len, ignore_index, pairs=True)
    parts = [NextTokenLabels(b, ignore_index) for b in built]
    mix = None
    if weights is not None or any(cap is not None for cap in caps):
        mixing.check_sources([len(b) for b in built], weights, section)
        mix = mixing.draw([len(b) for b in built], weights, caps, seed)
        ds = samples = mixing.MixedDataset(parts, mix.draws)
    else:
        ds = samples = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    packed = packed_flags[0]
    if packed:
        if tokenizer.max_seq_len is None:
            raise UserError("dataset.packed is True but tokenizer.max_seq_len is null; set tokenizer.max_seq_len=2048")
        ds = PackedDataset(ds, max_seq_len=tokenizer.max_seq_len, padding_idx=tokenizer.pad_id)
    names = [source_name(cfg) for cfg in cfgs]
    return BuiltDataset(ds, packed, samples, built, tokenizer.max_seq_len, ignore_index, mix=mix, names=names)


def source_name(cfg: dict) -> str:
    """What a dataset section reads, for the summary: its source file or Hub name, else its builder's name."""
    files = cfg.get("data_files")
    source = cfg.get("source")
    if source in (None, "json", "csv", "parquet", "text", "arrow") and files is not None:
        return ", ".join(map(str, as_list(files)))
    return str(source) if source is not None else str(cfg.get("_component_", "")).rsplit(".", 1)[-1]


def collate_for(built: BuiltDataset, collate_fn: str, pad_id: int, ignore_index: int) -> Callable:
    """Packed rows are already padded; unpacked samples (and pairs) are padded to the longest in the batch."""
    if built.pairs:
        return partial(collate_pairs, padding_idx=pad_id, ignore_idx=ignore_index)
    if built.packed:
        return padded_collate_packed
    module, _, name = collate_fn.rpartition(".")
    return partial(getattr(importlib.import_module(module), name), padding_idx=pad_id, ignore_idx=ignore_index)


def dataloader(
    built: BuiltDataset, batch_size: int, collate: Callable, world: int, rank: int, seed: int, shuffle: bool
) -> StatefulDataLoader:
    """Training batches: a batch is ``batch_size x processes`` consecutive samples of one seeded shuffle, each
    process taking its share, so keeping that product gives the same batches for any number of processes."""
    sampler = StatefulDistributedSampler(
        built.dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
    )
    return _loader(built.dataset, batch_size, sampler, collate, drop_last=True)


def eval_dataloader(built: BuiltDataset, batch_size: int, collate: Callable, world: int, rank: int, ignore_index: int):
    """Evaluation batches: every sample once, in order, split across processes (see EvalShard)."""
    shard = EvalShard(built.dataset, rank, world, ignore_index)
    sampler = StatefulDistributedSampler(shard, num_replicas=1, rank=0, shuffle=False)
    return _loader(shard, batch_size, sampler, collate, drop_last=False)


def _loader(dataset: Dataset, batch_size: int, sampler, collate: Callable, drop_last: bool) -> StatefulDataLoader:
    return StatefulDataLoader(
        dataset=dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator(),  # not the global one: a resumed run must draw what the first would
    )
