"""A Hugging Face Llama folder as GGUF, the file llama.cpp, Ollama and LM Studio read.

The f16 file is written here with ``gguf`` (llama.cpp's own Python writer): the weights under llama.cpp's
tensor names, q/k projections put back in the interleaved rotary layout llama.cpp's RoPE expects, Llama 3's
RoPE scaling as the ``rope_freqs`` factors, and the tokenizer (vocabulary, merges, special tokens) and chat
template in the metadata. Quantized files (q8_0, q4_k_m, ...) are made from it by llama.cpp's quantizer,
called through llama-cpp-python. Every file is written under a temporary name and renamed when complete.
"""

import ctypes
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from lora_tools.errors import UserError

# llama.cpp's file types by the names its quantizer takes (LLAMA_FTYPE_MOSTLY_*), with about how many bytes a
# weight takes (for the disk estimate).
QUANT_TYPES = {
    "f16": (1, 2.0),
    "q8_0": (7, 1.065),
    "q6_k": (18, 0.82),
    "q5_k_m": (17, 0.69),
    "q5_k_s": (16, 0.69),
    "q5_0": (8, 0.69),
    "q4_k_m": (15, 0.63),
    "q4_k_s": (14, 0.57),
    "q4_0": (2, 0.57),
    "q3_k_m": (12, 0.49),
    "q2_k": (10, 0.41),
}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5


def pinned_template(template: str, date_string: str | None) -> str:
    """The template with the date training rendered set inside it: servers pass today's date (llama-server's
    Llama 3 handler passes date_string even without tools), and a set at the top wins over a passed value."""
    if date_string is None or "date_string" not in template:
        return template
    return f'{{%- set date_string = "{date_string}" -%}}' + template


def parse_quants(text: str) -> list[str]:
    """``f16,q8_0,q4_k_m`` -> the list, f16 first (the others are made from it)."""
    names = [q.strip().lower() for q in text.split(",") if q.strip()]
    unknown = [q for q in names if q not in QUANT_TYPES]
    if unknown or not names:
        shown = unknown[0] if unknown else text
        raise UserError(f"--quant {shown!r} is not a quantization type; use one or more of {', '.join(QUANT_TYPES)}")
    return ["f16"] + [q for q in dict.fromkeys(names) if q != "f16"]


def estimated_bytes(model_dir: Path, quants: list[str]) -> int:
    """Each file's weights at its bytes per weight, from the safetensors sizes (bf16/f16 = 2 bytes a weight)."""
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2
    return int(sum(weights * QUANT_TYPES[q][1] for q in quants))


def _permute_for_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half q/k rows -> the interleaved pairs llama.cpp rotates."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_factors(config: dict) -> np.ndarray | None:
    """Llama 3's frequency-dependent RoPE scaling as the divisor of each rotary frequency."""
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type") != "llama3":
        return None
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (config["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(key: str, config: dict, model_dir: Path) -> str | None:
    """llama.cpp's name for a Hugging Face Llama weight; None for a tied output layer (llama.cpp reuses
    token_embd)."""
    if key == "model.embed_tokens.weight":
        return "token_embd.weight"
    if key == "model.norm.weight":
        return "output_norm.weight"
    if key == "lm_head.weight":
        return None if config.get("tie_word_embeddings") else "output.weight"
    parts = key.split(".")  # model.layers.<i>.<module>.<proj>.weight
    module = ".".join(parts[3:-1])
    if parts[:2] != ["model", "layers"] or parts[-1] != "weight" or module not in _LAYER_NAMES:
        raise UserError(f"{model_dir}: weight {key} is not part of a Llama model; export a Llama checkpoint")
    return f"blk.{parts[2]}.{_LAYER_NAMES[module]}.weight"


def _weights(model_dir: Path, config: dict):
    """(llama.cpp name, shape, a function that loads the array) for every weight, without loading any: the
    writer takes them one at a time, so a 3B export holds one tensor in memory, not the model."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out = []
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = _gguf_name(key, config, model_dir)
                if name is None:
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                heads_here = (
                    heads if name.endswith("attn_q.weight") else kv_heads if name.endswith("attn_k.weight") else 0
                )

                def load(path=path, key=key, heads_here=heads_here):
                    with safe_open(str(path), framework="pt") as g:
                        w = g.get_tensor(key)
                    if heads_here:
                        w = _permute_for_rope(w, heads_here)
                    return w.to(torch.float16 if w.dim() > 1 else torch.float32).numpy()

                out.append((name, shape, np.float16 if len(shape) > 1 else np.float32, load))
    factors = _rope_factors(config)
    if factors is not None:
        out.append(("rope_freqs.weight", factors.shape, np.float32, lambda: factors))
    return out


def _tokenizer(model_dir: Path, vocab_size: int) -> dict:
    """Vocabulary, merges and special tokens from the Hugging Face tokenizer files."""
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab = dict(tokenizer["model"]["vocab"])
    special = set()
    for added in tokenizer.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["content"])
    by_id = {i: t for t, i in vocab.items()}
    size = max(vocab_size, max(by_id) + 1)  # embedding rows past the tokenizer's last id are unused slots
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    types = [
        TOKEN_UNUSED if i not in by_id else TOKEN_CONTROL if t in special else TOKEN_NORMAL
        for i, t in enumerate(tokens)
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"].get("merges", [])]

    def token_id(key: str) -> int | None:
        value = tokenizer_config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return vocab.get(value) if isinstance(value, str) else None

    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos": token_id("bos_token"),
        "eos": token_id("eos_token"),
        "eot": vocab.get("<|eot_id|>"),
        "eom": vocab.get("<|eom_id|>"),
        "pad": vocab.get("<|finetune_right_pad_id|>"),
    }


def write_f16(model_dir: Path, out: Path, name: str, template: str | None) -> None:
    """The model in ``model_dir`` (Hugging Face Llama files) as an f16 GGUF at ``out``, with ``template`` (the
    prompt format training used) as its chat template."""
    import gguf

    config = json.loads((model_dir / "config.json").read_text())
    tok = _tokenizer(model_dir, config["vocab_size"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(len(tok["tokens"]))
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")  # Llama 3's pre-tokenizer pattern, as tokenizer.json's Split has it
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id)):
        if tok[key] is not None:
            add(tok[key])
    for key, add in (("eot", writer.add_eot_token_id), ("eom", writer.add_eom_token_id)):
        if tok[key] is not None:
            add(tok[key])
    if tok["pad"] is not None:
        writer.add_pad_token_id(tok["pad"])
    writer.add_add_bos_token(True)
    if template is not None:
        writer.add_chat_template(template)
    weights = _weights(model_dir, config)
    for tensor_name, shape, dtype, _ in weights:
        writer.add_tensor_info(tensor_name, shape, np.dtype(dtype), math.prod(shape) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, _, _, load in weights:
        writer.write_tensor_data(load())
    writer.close()


def write_lora(adapter_dir: Path, config: dict, out: Path, name: str) -> None:
    """A PEFT LoRA adapter (``adapter/``) as a llama.cpp LoRA GGUF at ``out`` (f16), for ``--lora`` and Ollama's
    ADAPTER: each A and B matrix under its base weight's llama.cpp name plus ``.lora_a`` / ``.lora_b``, B's rows
    of the q/k projections put in llama.cpp's rotary layout as the model export puts the weights', and LoRA's
    alpha, from which llama.cpp scales the update by alpha / rank as PEFT does."""
    import gguf

    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if adapter_config.get("use_dora"):
        raise UserError(f"{adapter_dir} is a DoRA adapter, which llama.cpp cannot apply; export the merged model")
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors = []
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        for key in sorted(f.keys()):  # base_model.model.<Hugging Face weight name minus .weight>.lora_A.weight
            module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
            base_name = _gguf_name(f"{module}.weight", config, adapter_dir)
            w = f.get_tensor(key).float()
            kind = base_name.split(".")[2]
            if part == "B.weight" and kind in heads:
                w = _permute_for_rope(w, heads[kind])
            tensors.append((f"{base_name}.lora_{part[0].lower()}", w.to(torch.float16).numpy()))
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter_config["lora_alpha"]))
    for tensor_name, array in tensors:
        writer.add_tensor(tensor_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(f16: Path, out: Path, quant: str) -> None:
    """llama.cpp's own quantizer, through llama-cpp-python."""
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError):  # not installed, or its compiled library does not load
        raise UserError(
            f"--quant {quant} needs llama.cpp's quantizer from llama-cpp-python; install it with `make gguf-install` "
            "(it compiles llama.cpp the first time, a few minutes), or export f16 only"
        )
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[quant][0]
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0:
        raise UserError(f"llama.cpp could not quantize {f16} to {quant} (status {status})")


def export(model_dir: Path, out_dir: Path, quants: list[str], name: str, template: str | None) -> list[Path]:
    """``model-<quant>.gguf`` for each quant (f16 first) in ``out_dir``, each complete or absent."""
    missing = [f for f in ("config.json", "tokenizer.json", "tokenizer_config.json") if not (model_dir / f).is_file()]
    if missing or not any(model_dir.glob("*.safetensors")):
        what = missing[0] if missing else "*.safetensors"
        raise UserError(f"{model_dir} has no {what}; export a Hugging Face model folder (a checkpoint's model/)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".tmp-model-*.gguf"):  # left by an export that was killed
        stale.unlink()
    needed, free = estimated_bytes(model_dir, quants), shutil.disk_usage(out_dir).free
    if free < needed:
        raise UserError(
            f"not enough disk for the GGUF files in {out_dir}: about {needed / 1e9:.2f} GB needed, "
            f"{free / 1e9:.2f} GB free; free space or ask for fewer --quant types"
        )
    written = []
    for quant in quants:
        final = out_dir / f"model-{quant}.gguf"
        partial = out_dir / f".tmp-model-{quant}.gguf"
        try:
            if quant == "f16":
                write_f16(model_dir, partial, name, template)
            else:
                quantize(out_dir / "model-f16.gguf", partial, quant)
            os.replace(partial, final)
        finally:
            partial.unlink(missing_ok=True)
        written.append(final)
    return written


def ollama_template(render) -> str:
    """The training prompt format in Ollama's template language, read off the training template itself.

    ``render(messages)`` is the training template with the generation prompt. Probes with and without a system
    message give the text before the first user turn (Llama 3.2's system block, date included, or nothing);
    the turns are Llama 3's headers, which every template this project trains with uses.
    """
    user = "<|start_header_id|>user<|end_header_id|>\n\n"
    with_system = render([{"role": "system", "content": "\x01"}, {"role": "user", "content": "\x02"}])
    without = render([{"role": "user", "content": "\x02"}])
    sys_prefix, _, rest = with_system.partition("\x01")
    sys_suffix = rest.partition(user)[0]
    no_system = without.partition(user)[0]
    for text in (sys_prefix, no_system):  # Ollama adds BOS itself
        if not text.startswith("<|begin_of_text|>"):
            raise UserError("the training template does not start with <|begin_of_text|>; no Modelfile for it")
    sys_prefix, no_system = sys_prefix.removeprefix("<|begin_of_text|>"), no_system.removeprefix("<|begin_of_text|>")
    return (
        '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{- $system = .Content }}{{- end }}'
        "{{- end }}"
        f"{{{{- if $system }}}}{sys_prefix}{{{{ $system }}}}{sys_suffix}{{{{- else }}}}{no_system}{{{{- end }}}}"
        '{{- range .Messages }}{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
        "{{ .Content }}<|eot_id|>{{- end }}{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def ollama_render(template: str, messages: list[dict]) -> str:
    """What Ollama renders from ``ollama_template``'s output for ``messages`` (its Go template, evaluated here
    for the few constructs it uses), so the export can check it against the training format."""
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    head, _, rest = template.partition("{{- if $system }}")
    with_sys, _, rest = rest.partition("{{- else }}")
    no_sys, _, rest = rest.partition("{{- end }}")
    out = with_sys.replace("{{ $system }}", system) if system else no_sys
    for m in messages:
        if m["role"] != "system":
            out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
    return out + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def modelfile(gguf_path: str, template: str, adapter: str | None = None) -> str:
    """An Ollama Modelfile: the GGUF (a path relative to the Modelfile), the LoRA GGUF applied to it if any, the
    training prompt format, the stop tokens."""
    return (
        f"FROM {gguf_path}\n" + (f"ADAPTER {adapter}\n" if adapter else "") + f'TEMPLATE """{template}"""\n'
        'PARAMETER stop "<|eot_id|>"\n'
        'PARAMETER stop "<|eom_id|>"\n'
        'PARAMETER stop "<|end_of_text|>"\n'
    )
