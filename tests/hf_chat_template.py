"""Run in the Hugging Face environment (.venv-hf: transformers, no torchtune).

    hf_chat_template.py MODEL_DIR IN.json OUT.json

IN.json: {"conversations": [[{"role", "content"}, ...], ...], "kwargs": {...}}; a conversation may also be
{"messages": [...], "tools": [...], "kwargs": {...}}, its own tool schemas and extra template variables. For each
conversation, with the
plain transformers calls on MODEL_DIR's tokenizer files, OUT.json gets the token ids of the whole conversation
(``apply_chat_template``), of the prompt a server builds to answer its last turn (everything before the last
assistant message, ``add_generation_prompt=True``), and the rendered text. Also the ids of the assistant header.
"""

import json
import sys

from transformers import AutoTokenizer


def main(model_dir: str, in_path: str, out_path: str) -> None:
    request = json.loads(open(in_path, encoding="utf-8").read())
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = {"conversations": []}
    shared = request.get("kwargs", {})
    for conversation in request["conversations"]:
        if isinstance(conversation, dict):
            messages = conversation["messages"]
            kwargs = {**shared, **conversation.get("kwargs", {}), "tools": conversation.get("tools")}
        else:
            messages, kwargs = conversation, shared
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        out["conversations"].append(
            {
                "ids": list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]),
                "prompt_ids": list(
                    tok.apply_chat_template(
                        messages[:last], add_generation_prompt=True, tokenize=True, return_dict=True, **kwargs
                    )["input_ids"]
                ),
                "text": tok.apply_chat_template(messages, tokenize=False, **kwargs),
            }
        )
    header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    out["assistant_header"] = tok(header, add_special_tokens=False)["input_ids"]
    out["eot"] = tok.convert_tokens_to_ids("<|eot_id|>")
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
