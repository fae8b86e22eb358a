"""The configured model: built with shapes only (the meta device), and set up for training as the recipe and
the memory plan both do it (compile, activation checkpointing of some or all layers); ``eager`` runs the
compiled layers uncompiled where compiling would not pay."""

import torch
from torch import nn
from torchtune import config, training
from torchtune.modules.common_utils import local_kv_cache

from lora_tools.errors import UserError


def is_qlora(model_cfg) -> bool:
    return bool(model_cfg.get("quantize_base", False)) or ".qlora_" in str(model_cfg._component_)


def meta_model(model_cfg, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The configured model on the meta device: shapes only, no memory, about a second even for 3B. A QLoRA
    model is built unquantized: torchao's NF4 needs real weights (and runs on no fake tensor), and does not
    change shapes. A builder refusing its arguments is one line."""
    try:
        with training.set_default_dtype(dtype), torch.device("meta"):
            return config.instantiate(model_cfg, **({"quantize_base": False} if is_qlora(model_cfg) else {}))
    except (ValueError, TypeError, AssertionError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model: {model_cfg._component_} refuses these settings: {reason}; change the model section")


def prepare(model: nn.Module, compile: bool, checkpointed_layers: int | None, verbose: bool = True) -> None:
    """Compile each transformer layer (torchtune's way), then checkpoint ``checkpointed_layers`` of them
    (0: none, None: all)."""
    if compile:
        # Generation's KV caches (torchtune's local_kv_cache) leave each attention's kv_cache an empty submodule
        # slot where a plain None attribute was: set them up and delete them once now, as generation does, so
        # that the first generation does not invalidate the graphs compiled before it.
        meta = torch.device("meta")
        with local_kv_cache(model, batch_size=1, device=meta, dtype=torch.float32, decoder_max_seq_len=1):
            pass
        training.compile_model(model, verbose=verbose)
    if checkpointed_layers != 0:
        checkpoint_layers(model, checkpointed_layers)


def eager():
    """A context in which compiled code runs uncompiled: ``torch.compiler.set_stance("force_eager")``.

    Generation and lm-eval run in it. With a KV cache, one more position each call, or the adapters switched
    off, every call would need a new graph of the compiled layers, until torch._dynamo.config.recompile_limit
    (8) stops compiling them with a warning. Training and validation stay compiled (tests/test_compile.py).
    """
    return torch.compiler.set_stance("force_eager")


def checkpoint_layers(model: nn.Module, count: int | None) -> list[int]:
    """Activation checkpointing on ``count`` of the model's transformer layers (all when None), spread evenly.

    Which layers recompute does not change the memory saved, only how much; spreading them keeps the saved
    activations even along the model. Returns the indices of the checkpointed layers.
    """
    layers = list(model.layers)
    count = len(layers) if count is None else min(count, len(layers))
    chosen = {round(i * len(layers) / count) for i in range(count)} if count else set()
    wrapped = {id(layers[i]) for i in chosen}
    if wrapped:
        # A callable policy is asked with recurse=True whether to look inside a module, then whether to wrap it.
        policy = lambda module, recurse, **_: recurse or id(module) in wrapped  # noqa: E731
        training.set_activation_checkpointing(model, auto_wrap_policy=policy)
    return sorted(chosen)
