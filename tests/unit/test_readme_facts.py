"""Figures that README.md and docs/ state about the repository's own files, recomputed from those files.

Each fact is found by its number and a unit or label next to it (``3.33M-parameter``, ``6.43 GB (f16)``), never
by a whole sentence: every statement of it, on any page, must carry the recomputed value, and at least one must
exist. Rewording a page keeps these tests green; a stale or mistyped figure turns them red.
"""

import json
import math
import re
from pathlib import Path

from omegaconf import OmegaConf
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "assets" / "tiny"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _pages() -> dict[str, str]:
    """Each page's text with line breaks and runs of spaces made single spaces."""
    return {p.relative_to(REPO).as_posix(): " ".join(p.read_text(encoding="utf-8").split()) for p in PAGES}


def _stated(pattern: str, skip: tuple[str, ...] = ()) -> list[tuple]:
    """Every match of ``pattern`` on any page but those in ``skip``: its groups (one group: the string)."""
    found = []
    for page, text in _pages().items():
        if page not in skip:
            found += re.findall(pattern, text)
    return found


def _all_say(pattern: str, expected, skip: tuple[str, ...] = ()) -> None:
    found = _stated(pattern, skip)
    assert found, f"no page states {pattern!r} (expected {expected!r})"
    assert set(found) == {expected}, f"{pattern!r}: pages state {sorted(set(found))}, the files give {expected!r}"


def test_the_tiny_models_parameter_count():
    # The base model only (tied embeddings are stored once); the LoRA adapters come on top at training time.
    with safe_open(TINY / "model.safetensors", framework="pt") as f:
        total = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    _all_say(r"(\d+\.\d+)M-parameter", f"{total / 1e6:.2f}")


def test_what_a_3b_step_checkpoint_writes():
    """The stop-signal save: the shipped 3B config's adapter (counted on a meta-device model, no memory) in the
    safetensors file and in the resume state, plus AdamW's two moments, all in bf16 (2 bytes each)."""
    from torchtune.modules.peft import get_adapter_params

    from lora_tools.train.model import meta_model

    cfg = OmegaConf.load(REPO / "lora_finetune_single_device.yaml")
    n = sum(p.numel() for p in get_adapter_params(meta_model(cfg.model)).values())
    _all_say(r"(\d+\.\d)M parameters", f"{n / 1e6:.1f}")
    _all_say(r"save writes about (\d+\.\d+) GB", f"{4 * 2 * n / 1e9:.2f}")


def test_the_3b_gguf_sizes():
    """The GGUF sizes given for the 3B model: its weights (meta device) at the bytes per weight the export
    estimates disk with."""
    import torch
    from torchtune.models.llama3_2 import llama3_2_3b

    from lora_tools.export.gguf_export import QUANT_TYPES

    with torch.device("meta"):
        n = sum(p.numel() for p in llama3_2_3b().parameters())
    for quant in ("f16", "q8_0", "q4_k_m"):
        _all_say(rf"(\d+\.\d+) GB \({quant}\)", f"{n * QUANT_TYPES[quant][1] / 1e9:.2f}")
    assert f"{n / 1e9:.2f}B weights" in " ".join(_pages().values())


def test_the_measured_gguf_export_times():
    """The GGUF export times come from the committed bench result, as that file records them: the measured model's
    times and the ones scaled to 3B, each labelled with its quantization, on the page that names the file."""
    import torch
    from torchtune.models.llama3_2 import llama3_2_3b

    (path,) = sorted((REPO / "bench" / "results" / "gguf").glob("*.json"))[-1:]
    result = json.loads(path.read_text())
    with torch.device("meta"):
        layers = len(llama3_2_3b().layers)
    _all_say(r"(\d+) of its (\d+) layers", (str(result["model"]["shape"]["num_layers"]), str(layers)))
    assert result["command"] and result["commit"] and result["versions"] and not result["tree_dirty"]
    (text,) = [t for t in _pages().values() if f"bench/results/gguf/{path.name}" in t]
    assert f"`{result['command']}`" in text
    assert f"({result['model']['weights'] / 1e9:.2f}B weights)" in text
    for quant in ("f16", "q8_0", "q4_k_m"):
        stated = set(re.findall(rf"(\d+(?:\.\d+)?) s \({quant}\)", text))
        assert stated == {str(result["seconds"][quant]), str(result["seconds_for_3b"][quant])}, (quant, stated)


def test_the_tiny_assets_as_built():
    """The tiny assets' table and the demo's description: BPE and special-token counts, weight scale, and the
    demo data's counts, recomputed from the files."""
    from lora_tools.demo.assets import INIT_GAIN, MODEL

    bpe = len((TINY / "original" / "tokenizer.model").read_text().splitlines())
    special = len(json.loads((TINY / "special_tokens.json").read_text())["added_tokens"])
    _all_say(r"(\d+)-token byte-level BPE", str(bpe))
    _all_say(r"(\d+) special tokens", str(special))
    _all_say(r"ln\(vocab size (\d+)\)", str(bpe + special))  # the demo's printed first line
    std = f"{INIT_GAIN * MODEL['embed_dim'] ** -0.5:.2f}"
    _all_say(r"std (\d+\.\d+) / sqrt\(width\) = (\d+\.\d+)", (f"{INIT_GAIN:.2f}", std))
    _all_say(r"\(std (\d+\.\d+)\)", std)

    train = json.loads((TINY / "data" / "train.json").read_text())
    heldout = json.loads((TINY / "data" / "heldout.json").read_text())
    questions = {e["instruction"] for e in train}
    things = {e["output"].split()[1] for e in train}
    rounds = len(train) // len(questions)
    assert len(train) == rounds * len(questions) and all(train.count(e) == rounds for e in train[: len(questions)])
    assert not questions & {e["instruction"] for e in heldout}
    wordings = len(questions) // len(things)
    _all_say(r"(\d+) questions \(\d+ things", str(len(questions)))
    _all_say(r"(\d+) things", str(len(things)))
    _all_say(r"(\d+) wordings each", str(wordings))
    _all_say(r"(\d+) shuffled rounds", str(rounds))
    _all_say(r"\(([\d,]+) rows\)", f"{len(train):,}")
    _all_say(r"(\d+) held-out (?:questions|ones)", str(len(heldout)))
    held_out_wordings = len(heldout) // len(things)
    words = {5: "five", 6: "six", 7: "seven"}
    _all_say(r"asked in (\w+) wordings", words[wordings + held_out_wordings])

    chat = [len((TINY / "data" / f).read_text().splitlines()) for f in ("chat_train.jsonl", "chat_heldout.jsonl")]
    _all_say(r"([\d,]+) \+ ([\d,]+) conversations", tuple(f"{c:,}" for c in chat))


def test_the_demo_run_as_configured():
    """The demo's steps, batch and sampling interval are those of configs/tiny.yaml."""
    cfg = OmegaConf.load(REPO / "configs" / "tiny.yaml")
    steps = cfg.epochs * cfg.max_steps_per_epoch
    _all_say(r"(\d+) LoRA steps", str(steps))
    _all_say(r"LoRA steps of (\d+) questions", str(cfg.batch_size * cfg.gradient_accumulation_steps))
    _all_say(r"Every (\d+) steps it prints", str(cfg.sample_every_n_steps))
    _all_say(r"sample at step (\d+) \|", str(steps), skip=(PREFERENCE,))  # that page shows the DPO demo's
    _all_say(r"step_(\d+)/(?:adapter|model)", f"{steps:07d}")


PREFERENCE = "docs/preference.md"


def test_the_dpo_demo_run_as_configured():
    """docs/preference.md's account of make demo-dpo: its steps, pairs per step and validation interval are those
    of configs/tiny_dpo.yaml, and the samples it shows are from before training and the last step."""
    cfg = OmegaConf.load(REPO / "configs" / "tiny_dpo.yaml")
    steps = cfg.epochs * cfg.max_steps_per_epoch
    text = _pages()[PREFERENCE]
    assert re.findall(r"for (\d+) steps of (\d+) pairs", text) == [(str(steps), str(cfg.batch_size))]
    assert re.findall(r"every (\d+) steps, and prints the held-out table", text) == [str(cfg.run_val_every_n_steps)]
    assert set(re.findall(r"sample at step (\d+) \|", text)) == {"0", str(steps)}


def test_the_several_gpu_table_matches_the_configs():
    """docs/multi-gpu.md's table of what the distributed config changes: each plain value in it is the configs'."""
    one = OmegaConf.load(REPO / "lora_finetune_single_device.yaml")
    several = OmegaConf.load(REPO / "configs" / "llama3_2_3b_lora_distributed.yaml")
    text = (REPO / "docs" / "multi-gpu.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \| ([^|]+) \|", text, re.M)
    assert len(rows) >= 4, rows
    for key, single, multi in rows:
        for cfg, stated in ((one, single.strip()), (several, multi.strip())):
            if stated != "-":
                assert str(cfg[key]) == stated, (key, cfg[key], stated)
            else:
                assert key not in cfg, key


def test_the_tool_demo_as_configured_and_built():
    """docs/demo.md's account of make demo-tools: its steps and batch (configs/tiny_tools.yaml), its data's counts
    (the files), and the tool base's scale (lora_tools.demo.assets, which writes it)."""
    from lora_tools.demo.assets import TOOL_BASE_GAIN, TOOL_BASE_QK_GAIN

    cfg = OmegaConf.load(REPO / "configs" / "tiny_tools.yaml")
    assert cfg.checkpointer.checkpoint_dir == "assets/tiny/tool_base"
    _all_say(r"(\d+) steps of (\d+) generated tool conversations", (str(cfg.max_steps_per_epoch), str(cfg.batch_size)))
    train, held = (
        len((TINY / "data" / f).read_text().splitlines()) for f in ("tools_train.jsonl", "tools_heldout.jsonl")
    )
    assert cfg.epochs * train == cfg.max_steps_per_epoch * cfg.batch_size  # one epoch, every conversation once
    _all_say(r"([\d,]+) for training and (\d+) held out", (f"{train:,}", str(held)))
    _all_say(
        r"scaled to (\d\.\d) / sqrt\(width\), and to (\d\.\d) / sqrt", (f"{TOOL_BASE_GAIN}", f"{TOOL_BASE_QK_GAIN}")
    )
