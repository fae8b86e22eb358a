"""Unit tier: torchtune weights -> PEFT adapter and merged Hugging Face weights, on one attention layer of the tiny
shape (8 query heads, 2 key/value heads, width 256). No model is built and no file is read."""

import json

import pytest
import torch

from lora_tools.errors import UserError
from lora_tools.export.gguf_export import write_lora
from lora_tools.export.hf_export import AdapterSpec, merged_hf_weights, peft_adapter_config, peft_adapter_weights

HF_CONFIG = {"hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32}
RANK, ALPHA = 4, 8.0
SHAPES = {"q_proj": 256, "k_proj": 64}  # output rows of each projection


def spec(dora: bool) -> AdapterSpec:
    return AdapterSpec(RANK, ALPHA, ("q_proj", "k_proj"), mlp=False, output=False, dropout=0.0, dora=dora)


def layer(dora: bool) -> tuple[dict, dict]:
    """Base weights and a trained-looking adapter for q_proj and k_proj of layer 0, torchtune keys."""
    g = torch.Generator().manual_seed(0)
    base, adapter = {}, {}
    for proj, rows in SHAPES.items():
        prefix = f"layers.0.attn.{proj}"
        base[f"{prefix}.weight"] = torch.randn(rows, 256, generator=g)
        adapter[f"{prefix}.lora_a.weight"] = torch.randn(RANK, 256, generator=g)
        adapter[f"{prefix}.lora_b.weight"] = torch.randn(rows, RANK, generator=g)
        if dora:  # rows of different sizes, so a row-order mistake shows
            adapter[f"{prefix}.magnitude"] = torch.rand(rows, generator=g) * 10 + 1
    return base, adapter


def copy(weights: dict) -> dict:
    return {k: v.clone() for k, v in weights.items()}  # the merge consumes the base weights


def hf(proj: str, kind: str = "weight") -> str:
    return f"model.layers.0.self_attn.{proj}.{kind}"


def test_lora_adapter_in_peft_layout_reproduces_the_merged_weights():
    base, adapter = layer(dora=False)
    merged = merged_hf_weights(copy(base), adapter, spec(False), HF_CONFIG)
    unmerged = merged_hf_weights(copy(base), {}, spec(False), HF_CONFIG)
    peft = peft_adapter_weights(adapter, HF_CONFIG)
    for proj in SHAPES:
        a = peft[f"base_model.model.{hf(proj, 'lora_A.weight')}"]
        b = peft[f"base_model.model.{hf(proj, 'lora_B.weight')}"]
        # What PEFT computes: W_hf + (alpha / r) B A, in Hugging Face's rotary row order.
        torch.testing.assert_close(unmerged[hf(proj)] + ALPHA / RANK * b @ a, merged[hf(proj)], rtol=1e-5, atol=1e-5)


def test_dora_magnitude_follows_the_rows_of_the_converted_weight():
    base, adapter = layer(dora=True)
    merged = merged_hf_weights(base, adapter, spec(True), HF_CONFIG)
    peft = peft_adapter_weights(adapter, HF_CONFIG)
    for proj in SHAPES:
        magnitude = peft[f"base_model.model.{hf(proj, 'lora_magnitude_vector')}"]
        # A merged DoRA weight's rows have exactly the learned magnitudes as norms: the magnitude PEFT receives
        # must be in the converted weight's row order.
        torch.testing.assert_close(merged[hf(proj)].norm(dim=1), magnitude, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(magnitude, adapter[f"layers.0.attn.{proj}.magnitude"])  # q/k rows do move


def test_adapter_config_is_what_peft_reads():
    config = peft_adapter_config(spec(True), "meta-llama/Llama-3.2-3B-Instruct")
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["use_dora"] is True
    assert (config["r"], config["lora_alpha"]) == (RANK, ALPHA)
    assert sorted(config["target_modules"]) == ["k_proj", "q_proj"]
    assert config["base_model_name_or_path"] == "meta-llama/Llama-3.2-3B-Instruct"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merged_weights_keep_the_base_dtype(dtype):
    base, adapter = layer(dora=False)
    base = {k: v.to(dtype) for k, v in base.items()}
    assert {v.dtype for v in merged_hf_weights(base, adapter, spec(False), HF_CONFIG).values()} == {dtype}


def test_a_dora_adapter_is_refused_as_a_lora_gguf(tmp_path):
    """llama.cpp applies plain LoRA only: --gguf-adapter on a DoRA adapter is one line, and writes nothing."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"use_dora": True, "lora_alpha": 16, "r": 8}))
    with pytest.raises(UserError, match="DoRA adapter, which llama.cpp cannot apply; export the merged model"):
        write_lora(tmp_path, {"num_attention_heads": 8, "num_key_value_heads": 2}, tmp_path / "a.gguf", "x")
    assert not (tmp_path / "a.gguf").exists()
