"""LoRA finetuning of Llama 3.2 on several GPUs (or, to try it, several CPU processes) with FSDP2.

Launch from the repository root, one process per GPU:

    tune run --nproc_per_node 4 lora_finetune_distributed.py --config configs/llama3_2_3b_lora_distributed.yaml

Across several machines, torchrun's rendezvous options come before the recipe (see README, "Several GPUs").

This is the single-device recipe (lora_finetune_single_device.py) run by every process, with the steps that
change when the model is sharded replaced below. Config keys, outputs, checkpoints, exact resume and preflight
are the same. What differs:

- Processes: torchrun starts them; NCCL connects them on CUDA, gloo on the CPU.
- Model: built on the ``meta`` device (no memory), sharded layer by layer with FSDP2 (``fully_shard``); each
  process then holds 1/N of every weight and gathers a layer's full weights only while it computes.
- Data: each micro-batch is ``batch_size x N`` consecutive samples of one seeded shuffle, ``batch_size`` on
  each process, so the same global batch (``batch_size x gradient_accumulation_steps x N``) trains the same
  steps as one device would.
- Loss: token counts and loss sums are added over processes before the mean, as on one device.
- Checkpoints: full tensors are gathered to the first process, which writes them; the others wait.

Two keys only this recipe reads: ``fsdp_cpu_offload`` (keep weights, gradients and optimizer state in CPU
memory: fits larger models, runs slower) and ``fsdp_reshard_after_forward`` (True frees each layer's gathered
weights after its forward and gathers them again for backward: less memory, more communication).
"""

import logging
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune import config, modules, training

from lora_finetune_single_device import LoRAFinetuneRecipeSingleDevice, log
from lora_tools import checkpointing
from lora_tools.errors import UserError
from lora_tools.launch import recipe_main


class LoRAFinetuneRecipeDistributed(LoRAFinetuneRecipeSingleDevice):
    """LoRA with the base model and adapter sharded over the processes of a torchrun job (FSDP2)."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self._fsdp_cpu_offload = cfg.get("fsdp_cpu_offload", False)
        self._reshard_after_forward = cfg.get("fsdp_reshard_after_forward", True)
        if not self._is_main:
            log.setLevel(logging.ERROR)  # one copy of the log and its warnings, from the first process
        # self.seed is the same on every process (torchtune's set_seed shares the first one's when seed is null),
        # so all shuffle the data alike; each seeds its own generators with seed + rank (lora_dropout differs).

    def _model_init_device(self) -> torch.device:
        """Build on ``meta``: shapes only. Real tensors arrive shard by shard in _load_weights."""
        return torch.device("meta")

    def _shard_model(self, model: torch.nn.Module) -> None:
        """Shard each transformer layer, then the rest (embeddings, final norm) as the root.

        The root keeps its gathered weights after forward (FSDP's default for the root): the recipe applies the
        output layer, whose weights are the embedding's, after the model's forward (see _loss_step).
        """
        for name, param in model.named_parameters():  # QLoRA: NF4 weights shard by whole quantization blocks
            if isinstance(param, NF4Tensor) and param.quantization_factor.numel() % self._world_size:
                raise UserError(
                    f"model.quantize_base: {name} has {param.quantization_factor.numel()} quantization block(s), which "
                    f"do not split evenly over {self._world_size} processes; use a process count that divides it, "
                    "or lora_finetune_single_device.py"
                )
        offload = {"offload_policy": CPUOffloadPolicy()} if self._fsdp_cpu_offload else {}
        for layer in model.modules():
            if isinstance(layer, modules.TransformerSelfAttentionLayer):
                fully_shard(layer, reshard_after_forward=self._reshard_after_forward, **offload)
        fully_shard(model, reshard_after_forward=False, **offload)
        with self._device:  # RoPE's cached tables are buffers, not weights: compute them on each process
            for m in model.modules():
                if hasattr(m, "rope_init"):
                    m.rope_init()

    def _load_weights(self, model: torch.nn.Module, state_dict: dict):
        return training.load_from_full_model_state_dict(
            model, state_dict, self._device, strict=False, cpu_offload=self._fsdp_cpu_offload
        )

    def _logits(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """Sample generation: every process continues with the first one's logits, so all pick the same tokens
        and run the same number of forward passes (each one gathers weights from all of them)."""
        logits = super()._logits(tokens, **kwargs)
        dist.broadcast(logits, src=0)
        return logits

    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        value = value.to(self._device, copy=True)
        dist.all_reduce(value)
        return value

    def _clip_grad_norm_(self) -> torch.Tensor:
        norm = super()._clip_grad_norm_()
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full CPU tensors on the first process (an empty dict on the others)."""
        state = training.gather_cpu_state_dict(self._model, self._is_main, device=self._device)
        if self._device.type == "cpu":  # one process on the CPU gets its live weights back: merging would alter them
            state = {k: v.clone() for k, v in state.items()}
        return state

    def _optimizer_state(self) -> dict:
        return training.get_full_optimizer_state_dict(self._model, self._optimizer, self._is_main, self._device)

    def _load_optimizer_state(self, state: dict) -> None:
        training.load_from_full_optimizer_state_dict(self._model, self._optimizer, state, self._device)

    def _rng_states(self) -> list[dict]:
        states = [None] * self._world_size
        dist.all_gather_object(states, checkpointing.rng_state())
        return states

    def _barrier(self) -> None:
        dist.barrier()

    def _setup_metric_logger(self, cfg_metric_logger: DictConfig):
        return super()._setup_metric_logger(cfg_metric_logger) if self._is_main else _NoMetrics()


class _NoMetrics:
    """The metric logger of every process but the first: one set of metrics per run."""

    def log_config(self, cfg) -> None: ...

    def log_dict(self, payload, step) -> None: ...

    def log(self, name, data, step) -> None: ...

    def close(self) -> None: ...


@recipe_main
def main(cfg: DictConfig) -> None:
    """LoRA finetuning with FSDP2. Usage: tune run --nproc_per_node N lora_finetune_distributed.py --config FILE"""
    if "LOCAL_RANK" not in os.environ:
        raise UserError(
            "lora_finetune_distributed.py runs under torchrun: tune run --nproc_per_node N "
            "lora_finetune_distributed.py --config ... (for one GPU, use lora_finetune_single_device.py)"
        )
    device_type = torch.device(cfg.device).type
    backend = training.get_distributed_backend(device_type, cfg.get("fsdp_cpu_offload", False))
    # 30 minutes (NCCL's default is 10): the others wait while the first process writes a merged model to disk.
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    try:
        if dist.get_rank() == 0:
            config.log_config(recipe_name="LoRAFinetuneRecipeDistributed", cfg=cfg)
        recipe = LoRAFinetuneRecipeDistributed(cfg=cfg)
        recipe.setup(cfg=cfg)
        recipe.train()
        recipe.cleanup()
        if recipe._is_main:
            print(recipe.summary(), flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
