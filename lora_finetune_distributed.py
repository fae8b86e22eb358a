"""LoRA finetuning of Llama 3.2 on several GPUs (or, to try it, several CPU processes) with FSDP2.

Launch from the repository root, one process per GPU:

    tune run --nproc_per_node 4 lora_finetune_distributed.py --config configs/llama3_2_3b_lora_distributed.yaml

Across several machines, torchrun's rendezvous options come before the recipe (see docs/multi-gpu.md).

Every process runs the recipe class of lora_finetune_single_device.py with the FSDP2 strategy
(lora_tools.train.parallel) in place of the one-device one. Config keys, outputs, checkpoints, exact resume and
preflight are the same. What the strategy changes:

- Processes: torchrun starts them; NCCL connects them on CUDA, gloo on the CPU.
- Model: built on the ``meta`` device (no memory), sharded layer by layer with FSDP2 (``fully_shard``); each
  process then holds 1/N of every weight and gathers a layer's full weights only while it computes.
- Data: each micro-batch is ``batch_size x N`` consecutive samples of one seeded shuffle, ``batch_size`` on
  each process, so the same global batch (``batch_size x gradient_accumulation_steps x N``) trains the same
  steps as one device would.
- Loss: token counts and loss sums are added over processes before the mean, as on one device.
- Checkpoints: adapter tensors are gathered to the first process, which writes them; the others wait.

Two keys only this recipe reads: ``fsdp_cpu_offload`` (keep weights, gradients and optimizer state in CPU
memory: fits larger models, runs slower) and ``fsdp_reshard_after_forward`` (True frees each layer's gathered
weights after its forward and gathers them again for backward: less memory, more communication).
"""

import logging
import os
import sys
import warnings
from datetime import timedelta

import torch.distributed as dist
from torchtune import training, utils

from lora_finetune_single_device import LoRAFinetuneRecipe, log
from lora_tools.config.loader import Loaded
from lora_tools.errors import UserError
from lora_tools.train.launch import recipe_main
from lora_tools.train.parallel import FSDP2


@recipe_main
def main(config: Loaded) -> None:
    """LoRA finetuning with FSDP2. Usage: tune run --nproc_per_node N lora_finetune_distributed.py --config FILE"""
    if "LOCAL_RANK" not in os.environ:
        raise UserError(
            "lora_finetune_distributed.py runs under torchrun: tune run --nproc_per_node N "
            "lora_finetune_distributed.py --config ... (for one GPU, use lora_finetune_single_device.py)"
        )
    s = config.settings
    device = utils.get_device(s.device)
    backend = training.get_distributed_backend(device.type, s.fsdp_cpu_offload)
    # 30 minutes (NCCL's default is 10): the others wait while the first process writes the merged model.
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    try:
        strategy = FSDP2(device, s.fsdp_cpu_offload, reshard_after_forward=s.fsdp_reshard_after_forward)
        if not strategy.is_main:  # one copy of the log and of Python's warnings, from the first process
            log.setLevel(logging.ERROR)
            warnings.simplefilter("ignore")
        recipe = LoRAFinetuneRecipe(config.cfg, s, strategy=strategy)
        recipe.setup()
        recipe.train()
        recipe.finish()
        recipe.cleanup()
        if strategy.is_main:
            print(recipe.summary(), flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
