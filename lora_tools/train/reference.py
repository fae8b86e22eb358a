"""DPO's reference log-probs computed once, before training (``objective.precompute_reference: True``).

The reference is then the model as training starts: the base, or the base with a starting adapter (an SFT
run's), which switching the adapters off could not give. Each pair's two summed response log-probs are kept with
the data (``lora_tools.data.batching.ShiftedPairs.reference``) and in every checkpoint, so a resumed run uses the
same numbers and no reference forward runs during training.
"""

import time

import torch
from torchtune import utils

from lora_tools.data import batching
from lora_tools.errors import UserError
from lora_tools.train.objectives import response_logps

log = utils.get_logger("INFO")


def wanted(objective) -> bool:
    return bool(getattr(objective, "precompute_reference", False))


def check_start(objective, start_adapter: str | None) -> None:
    """DPO from a starting adapter needs the reference precomputed: with the adapters switched off, the reference
    would be the bare base, not the model as training starts."""
    if start_adapter and getattr(objective, "requires_reference", False) and not wanted(objective):
        raise UserError(
            "start_adapter with DPO needs objective.precompute_reference=True, so that the reference is the base "
            "with that adapter (switching the adapter off would leave the bare base); add it to the objective"
        )


def saved(state: dict, folder, names: list[str]) -> dict[str, torch.Tensor]:
    """The reference log-probs a resumed checkpoint holds for each dataset; a run saved without them cannot get
    them back (the model has trained since), so that is one line."""
    kept = state.get("reference_logps") or {}
    missing = [name for name in names if name not in kept]
    if missing:
        raise UserError(
            f"{folder} has no precomputed reference log-probs for {missing[0]} (it was saved without "
            "objective.precompute_reference, or with another dataset section); resume with "
            "objective.precompute_reference=False"
        )
    return kept


@torch.no_grad()
def precompute(objective, parts, built: batching.BuiltDataset, batch_size: int, collate, strategy, device):
    """[pairs, 2] summed log-probs of each pair's chosen and rejected response under the model as it is now.
    Every process scores its share (as for validation) and the shares are added up, so each has them all."""
    t0, ignore = time.perf_counter(), built.ignore_index
    loader = batching.eval_dataloader(built, batch_size, collate, strategy.world_size, strategy.rank, ignore)
    out = torch.zeros(len(built.dataset), 2, device=device)
    parts.model.eval()
    for batch in loader:
        utils.batch_to_device(batch, device)
        chosen, rejected = response_logps(parts, batch, objective.ignore_index)[0].chunk(2)
        real = (batch["labels"][: len(chosen)] != objective.ignore_index).any(dim=1)  # not a padding pair
        index = batch["index"][real]
        out[index, 0], out[index, 1] = chosen[real], rejected[real]
    parts.model.train()
    out = strategy.sum(out).cpu()
    log.info(f"Reference log-probs of {len(out)} pairs computed in {time.perf_counter() - t0:.1f}s.")
    return out


def attach(built_sets: dict, resume: dict | None, folder, scored: tuple, strategy, device) -> None:
    """Each dataset's reference log-probs onto its pairs: from the resumed checkpoint, or computed now (step 0).
    ``scored``: (objective, model parts, batch size, collate_fn setting, pad id)."""
    kept = saved(resume, folder, list(built_sets)) if resume else None
    objective, parts, batch_size, collate_fn, pad_id = scored
    for name, built in built_sets.items():
        if kept is not None:
            built.dataset.reference = kept[name]
            continue
        collate = batching.collate_for(built, collate_fn, pad_id, built.ignore_index)
        built.dataset.reference = precompute(objective, parts, built, batch_size, collate, strategy, device)
