"""Run in the Hugging Face environment (.venv-hf: transformers + peft, no torchtune/torchao).

    hf_logits.py BASE_DIR ADAPTER_DIR MODEL_DIR TOKENS_JSON OUT.safetensors

Loads the base model, base + PEFT adapter, and the merged model with the plain Hugging Face calls and saves the
logits of each for the given token ids.
"""

import json
import sys

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def logits(model, tokens):
    with torch.no_grad():
        return model.eval()(input_ids=tokens).logits.float().contiguous()


def main(base_dir, adapter_dir, model_dir, tokens_json, out):
    tokens = torch.tensor(json.loads(open(tokens_json).read()))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    result = {"base": logits(base, tokens)}
    result["peft"] = logits(PeftModel.from_pretrained(base, adapter_dir), tokens)
    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    result["merged"] = logits(merged, tokens)
    save_file(result, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
