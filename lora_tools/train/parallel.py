"""What changes when the model is sharded: one strategy object per way of running, used by the recipe.

``OneDevice`` is one process holding the whole model. ``FSDP2`` is one of N torchrun processes, each holding
1/N of every weight (PyTorch's ``fully_shard``), gathering a layer's full weights only while it computes. The
recipe calls the same methods either way; every method of ``FSDP2`` is a collective that all processes call
together, in the same order.
"""

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune import modules, training

from lora_tools.errors import UserError
from lora_tools.train import rng


class OneDevice:
    """One process; the model lives whole on the training device."""

    name = "one-device"
    world_size, rank, is_main = 1, 0, True

    def __init__(self, device: torch.device):
        self.device = device

    def build_device(self) -> torch.device:
        """Where the model is built: directly on the training device."""
        return self.device

    def shard(self, trunk: nn.Module) -> None:
        """Nothing to shard."""

    def load(self, model: nn.Module, state_dict: dict[str, Any]):
        """Load full tensors (base weights, or an adapter); returns (missing, unexpected) keys."""
        return model.load_state_dict(state_dict, strict=False)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """A sum over processes: with one, the value itself."""
        return value

    def grad_norm(self, params: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
        """Clip the gradients' total norm to max_norm (None: no clipping) and return the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(list(params), max_norm=math.inf if max_norm is None else max_norm)

    def full_weights(self, model: nn.Module, keys: set[str]) -> dict[str, torch.Tensor]:
        """CPU copies of the named weights (copies: the live tensors keep training)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k in keys}

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def rng_states(self) -> list[dict[str, Any]]:
        """Each process's random generator states (one here)."""
        return [rng.get_state()]

    def shared_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits every process agrees on (one process: its own)."""
        return logits

    def barrier(self) -> None:
        """Wait for every process: with one, nothing to wait for."""

    def metric_logger(self, build: Callable[[], Any]) -> Any:
        return build()


class FSDP2:
    """One process of a torchrun job; weights, gradients and optimizer state sharded over all of them."""

    name = "fsdp2"

    def __init__(self, device: torch.device, cpu_offload: bool, reshard_after_forward: bool):
        self.device = device
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.is_main = self.rank == 0
        self._cpu_offload = cpu_offload
        self._reshard_after_forward = reshard_after_forward

    def build_device(self) -> torch.device:
        """Build on ``meta``: shapes only. Real tensors arrive shard by shard in ``load``."""
        return torch.device("meta")

    def shard(self, trunk: nn.Module) -> None:
        """Shard each transformer layer, then the rest (embeddings, final norm, an untied head) as the root.

        The root keeps its gathered weights after forward: the recipe applies the output layer, whose weights
        are the embedding's (or the root's own untied head), after the trunk's forward.
        """
        for name, param in trunk.named_parameters():  # QLoRA: NF4 weights shard by whole quantization blocks
            if isinstance(param, NF4Tensor) and param.quantization_factor.numel() % self.world_size:
                raise UserError(
                    f"model.quantize_base: {name} has {param.quantization_factor.numel()} quantization block(s), "
                    f"which do not split evenly over {self.world_size} processes; use a process count that divides "
                    "it, or lora_finetune_single_device.py"
                )
        offload = {"offload_policy": CPUOffloadPolicy()} if self._cpu_offload else {}
        for layer in trunk.modules():
            if isinstance(layer, modules.TransformerSelfAttentionLayer):
                fully_shard(layer, reshard_after_forward=self._reshard_after_forward, **offload)
        fully_shard(trunk, reshard_after_forward=False, **offload)
        with self.device:  # RoPE's cached tables are buffers, not weights: compute them on each process
            for m in trunk.modules():
                if hasattr(m, "rope_init"):
                    m.rope_init()

    def load(self, model: nn.Module, state_dict: dict[str, Any]):
        return training.load_from_full_model_state_dict(
            model, state_dict, self.device, strict=False, cpu_offload=self._cpu_offload
        )

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        value = torch.as_tensor(value).to(self.device, copy=True)
        dist.all_reduce(value)
        return value

    def grad_norm(self, params: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm=math.inf if max_norm is None else max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def full_weights(self, model: nn.Module, keys: set[str]) -> dict[str, torch.Tensor]:
        """The named weights gathered to full CPU tensors on the first process (an empty dict elsewhere)."""
        out = {}
        for k, v in model.state_dict().items():
            if k in keys:
                full = v.full_tensor() if isinstance(v, DTensor) else v
                if self.is_main:
                    out[k] = full.detach().to("cpu", copy=True)
        return out

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return training.get_full_optimizer_state_dict(model, optimizer, self.is_main, self.device)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        training.load_from_full_optimizer_state_dict(model, optimizer, state, self.device)

    def rng_states(self) -> list[dict[str, Any]]:
        states = [None] * self.world_size
        dist.all_gather_object(states, rng.get_state())
        return states

    def shared_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The first process's logits on every process, so all pick the same tokens and run the same number of
        forward passes (each one gathers weights from all of them)."""
        dist.broadcast(logits, src=0)
        return logits

    def barrier(self) -> None:
        dist.barrier()

    def metric_logger(self, build: Callable[[], Any]) -> Any:
        """One set of metrics per run: the first process logs, the others log nothing."""
        return build() if self.is_main else _NoMetrics()


class _NoMetrics:
    """The metric logger of every process but the first."""

    def log_config(self, cfg) -> None: ...

    def log_dict(self, payload, step) -> None: ...

    def log(self, name, data, step) -> None: ...

    def close(self) -> None: ...
