"""Figures that README.md states about the repository's own files, recomputed from those files."""

import math
from pathlib import Path

from safetensors import safe_open

REPO = Path(__file__).resolve().parents[2]


def test_readme_states_the_tiny_models_parameter_count():
    # The base model only (tied embeddings are stored once); the LoRA adapters come on top at training time.
    with safe_open(REPO / "assets" / "tiny" / "model.safetensors", framework="pt") as f:
        total = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    stated = f"{total / 1e6:.2f}M-parameter"
    assert stated in (REPO / "README.md").read_text(), f"README should call the tiny model a {stated} Llama 3.2"


def test_readme_states_what_a_3b_step_checkpoint_writes():
    """The stop-signal save: the shipped 3B config's adapter (counted on a meta-device model, no memory) in the
    safetensors file and in the resume state, plus AdamW's two moments, all in bf16."""
    from omegaconf import OmegaConf
    from torchtune.modules.peft import get_adapter_params

    from lora_tools.train.model import meta_model

    cfg = OmegaConf.load(REPO / "lora_finetune_single_device.yaml")
    n = sum(p.numel() for p in get_adapter_params(meta_model(cfg.model)).values())
    readme = (REPO / "README.md").read_text()
    assert f"adapter has {n / 1e6:.1f}M parameters" in readme
    assert f"writes about {4 * 2 * n / 1e9:.2f} GB" in readme


def test_readme_states_the_3b_gguf_sizes():
    """The GGUF sizes README gives for the 3B model: its weights (meta device) at the bytes per weight the export
    estimates disk with."""
    import torch
    from torchtune.models.llama3_2 import llama3_2_3b

    from lora_tools.export.gguf_export import QUANT_TYPES

    with torch.device("meta"):
        n = sum(p.numel() for p in llama3_2_3b().parameters())
    sizes = {q: f"{n * QUANT_TYPES[q][1] / 1e9:.2f} GB" for q in ("f16", "q8_0", "q4_k_m")}
    stated = f"{sizes['f16']} (f16), {sizes['q8_0']} (q8_0) and {sizes['q4_k_m']} (q4_k_m)"
    readme = " ".join((REPO / "README.md").read_text().split())
    assert stated in readme and f"its {n / 1e9:.2f}B weights" in readme, stated


def test_readme_states_the_measured_gguf_export_times():
    """The GGUF export times README gives come from the committed bench result, as that file records them."""
    import json

    (path,) = sorted((REPO / "bench" / "results" / "gguf").glob("*.json"))[-1:]
    result = json.loads(path.read_text())
    assert result["command"] and result["commit"] and result["versions"] and not result["tree_dirty"]
    s, s3 = result["seconds"], result["seconds_for_3b"]
    readme = " ".join((REPO / "README.md").read_text().split())
    stated = (
        f"({result['model']['weights'] / 1e9:.2f}B weights) exported in {s['f16']} s (f16), {s['q8_0']} s (q8_0) "
        f"and {s['q4_k_m']} s (q4_k_m) (`{result['command']}`, `bench/results/gguf/{path.name}`); scaled per weight, "
        f"the 3B export takes about {s3['f16']} s, {s3['q8_0']} s and {s3['q4_k_m']} s there"
    )
    assert stated in readme, stated


def test_readme_describes_the_tiny_assets_as_built():
    """The tiny-asset table: BPE size, weight scale, and the demo data's counts, recomputed from the files."""
    import json

    from lora_tools.demo.assets import INIT_GAIN, MODEL

    tiny = REPO / "assets" / "tiny"
    readme = " ".join((REPO / "README.md").read_text().split())
    bpe = len((tiny / "original" / "tokenizer.model").read_text().splitlines())
    assert f"a {bpe}-token byte-level BPE" in readme
    assert f"std 1.28 / sqrt(width) = {INIT_GAIN * MODEL['embed_dim'] ** -0.5:.2f}" in readme
    train = json.loads((tiny / "data" / "train.json").read_text())
    heldout = json.loads((tiny / "data" / "heldout.json").read_text())
    questions = {e["instruction"] for e in train}
    things = {e["output"].split()[1] for e in train}
    rounds = len(train) // len(questions)
    assert len(train) == rounds * len(questions) and all(train.count(e) == rounds for e in train[: len(questions)])
    wordings = len(questions) // len(things)
    stated = f"{len(questions)} questions ({len(things)} things, {wordings} wordings each) in {rounds} shuffled rounds"
    assert f"{stated} ({len(train):,} rows), and the {len(heldout)} held-out ones" in readme
    assert not questions & {e["instruction"] for e in heldout}
