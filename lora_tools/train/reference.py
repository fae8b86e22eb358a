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
from lora_tools.train.objectives import response_logps

log = utils.get_logger("INFO")


def wanted(objective) -> bool:
    return bool(getattr(objective, "precompute_reference", False))


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
