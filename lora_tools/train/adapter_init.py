"""The adapter's starting weights, drawn from the seed alone.

torchtune draws LoRA A from the global random stream while it builds the model, so its values depend on the
device and on every base weight initialised before it. Drawing them here, on the CPU from a generator seeded
with the run's seed, gives the same adapter on CPU and GPU, built on a device or on ``meta`` (as the
distributed recipe does), for one process or many. The distributions are LoRA's: A Kaiming-uniform, B zero.
"""

import math

import torch


def initial_adapter_weights(adapter_params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU tensors for every adapter parameter, keyed as ``get_adapter_params`` keys them.

    DoRA magnitudes come back as ones: they depend on the base weights, and the recipe computes them with
    ``initialize_dora_magnitude`` once those are loaded.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, param in adapter_params.items():  # a fixed order: the model's module order
        full = torch.empty(param.shape, dtype=torch.float32)
        if name.endswith("lora_a.weight"):
            torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
        elif name.endswith("lora_b.weight"):
            full.zero_()
        elif name.endswith("magnitude"):
            full.fill_(1.0)
        else:
            raise ValueError(f"unknown adapter parameter {name}")
        weights[name] = full.to(param.dtype)
    return weights
