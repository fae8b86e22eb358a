"""How long GGUF export takes on this machine, measured on a model with the 3B model's width and vocabulary
but 4 of its 28 layers, then scaled per weight to the 3B model (the work is per weight: convert, write,
quantize). Writes bench/results/gguf/<date>-<commit>.json; README.md's 3B export time is checked against it.

    python -m bench.gguf_export_time
"""

import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from importlib import metadata
from pathlib import Path

import torch

from lora_tools.demo import assets as tiny_assets
from lora_tools.export import gguf_export

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(tiny_assets.MODEL, num_layers=4, num_heads=24, num_kv_heads=8, embed_dim=3072, intermediate_dim=8192)
VOCAB = 128256
WEIGHTS_3B = 3_212_749_824  # llama3_2_3b on the meta device (tests/unit/test_readme_facts.py counts it)


def main() -> int:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    )
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        specials = tiny_assets.special_tokens(VOCAB - 256)
        tiny_assets.write_model(model, VOCAB, specials, SHAPE, dtype=torch.bfloat16)
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
        ):  # the tiny tokenizer: vocabulary rows past it are unused slots
            (model / name).write_bytes((REPO / "assets/tiny" / name).read_bytes())
        weights = sum(p.stat().st_size for p in model.glob("*.safetensors")) // 2
        out = Path(tmp) / "gguf"
        out.mkdir()
        seconds = {}
        start = time.monotonic()
        gguf_export.write_f16(model, out / "model-f16.gguf", "timing", None)
        seconds["f16"] = time.monotonic() - start
        for quant in ("q8_0", "q4_k_m"):
            start = time.monotonic()
            gguf_export.quantize(out / "model-f16.gguf", out / f"model-{quant}.gguf", quant)
            seconds[quant] = time.monotonic() - start
        sizes = {q: (out / f"model-{q}.gguf").stat().st_size for q in seconds}
    result = {
        "command": "python -m bench.gguf_export_time",
        "commit": commit.stdout.strip(),
        "tree_dirty": bool(dirty.stdout.strip()),
        "date": date.today().isoformat(),
        "machine": {"device": f"CPU, {torch.get_num_threads()} threads", "platform": platform.platform()},
        "versions": {p: metadata.version(p) for p in ("torch", "gguf", "llama-cpp-python")},
        "model": {"shape": SHAPE, "vocab_size": VOCAB, "weights": weights},
        "seconds": {q: round(s, 1) for q, s in seconds.items()},
        "bytes": sizes,
        "seconds_for_3b": {q: round(s * WEIGHTS_3B / weights) for q, s in seconds.items()},
    }
    folder = REPO / "bench/results/gguf"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{result['date']}-{result['commit']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
