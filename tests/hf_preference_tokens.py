"""Run in the Hugging Face environment (.venv-hf: transformers, no torchtune).

    hf_preference_tokens.py MODEL_DIR IN.json OUT.json

IN.json: {"pairs": [{"prompt": [messages], "chosen": message, "rejected": message}, ...], "kwargs": {...}}. For each
pair, with the plain transformers calls on MODEL_DIR's tokenizer files, OUT.json gets the prompt's ids
(``apply_chat_template(prompt, add_generation_prompt=True)``) and the ids of the prompt followed by each response
(``apply_chat_template(prompt + [response])``).
"""

import json
import sys

from transformers import AutoTokenizer


def main(model_dir: str, in_path: str, out_path: str) -> None:
    request = json.loads(open(in_path, encoding="utf-8").read())
    tok = AutoTokenizer.from_pretrained(model_dir)
    kwargs = request.get("kwargs", {})

    def ids(messages, **more):
        return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs, **more)["input_ids"])

    out = {"pairs": []}
    for pair in request["pairs"]:
        prompt = pair["prompt"]
        out["pairs"].append(
            {
                "prompt_ids": ids(prompt, add_generation_prompt=True),
                "chosen_ids": ids(prompt + [pair["chosen"]]),
                "rejected_ids": ids(prompt + [pair["rejected"]]),
            }
        )
    out["eot"] = tok.convert_tokens_to_ids("<|eot_id|>")
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
