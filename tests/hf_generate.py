"""Run in the Hugging Face environment (.venv-hf: transformers, no torchtune).

    hf_generate.py MODEL_DIR PROMPTS.json N_NEW OUT.json

For each prompt (a list of token ids) in PROMPTS.json: the next-token logits after it, and the N_NEW tokens
greedy decoding appends (end-of-turn tokens do not stop it), with plain transformers calls on MODEL_DIR.
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM


def main(model_dir: str, prompts_path: str, n_new: str, out_path: str) -> None:
    prompts = json.loads(open(prompts_path).read())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {"logits": [], "greedy": []}
    with torch.no_grad():
        for ids in prompts:
            tokens = torch.tensor([ids])
            out["logits"].append(model(input_ids=tokens).logits[0, -1].tolist())
            generated = model.generate(
                tokens, max_new_tokens=int(n_new), min_new_tokens=int(n_new), do_sample=False, eos_token_id=None
            )
            out["greedy"].append(generated[0, len(ids) :].tolist())
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
