"""Try the finetuned model: greedy answers in the Llama 3 instruct chat template, streamed to the terminal.

    python -m lora_tools.generate --config configs/tiny.yaml --prompt "What color is the lemon?"
    python -m lora_tools.generate --config lora_finetune_single_device.yaml          # interactive chat
    python -m lora_tools.generate --config ... --checkpoint outputs/.../step_0000500 --merged

By default it loads the base model named by the config plus the adapter of the newest checkpoint under
output_dir (--checkpoint picks another; --merged loads that checkpoint's merged model instead). Extra key=value
arguments override the config as with `tune run` (e.g. device=cpu).
"""

import argparse
import sys
from pathlib import Path

from torchtune import config

from lora_tools import settings
from lora_tools.errors import UserError, fail
from lora_tools.inference import greedy, last_position_logits, load_model, prompt_tokens, uses_alpaca
from lora_tools.launch import load_config


def answer(tokenizer, model, trunk, prompt: str, max_new_tokens: int, alpaca: bool, out=sys.stdout) -> list[int]:
    """Stream one greedy answer to ``out``; returns its token ids."""
    device = next(model.parameters()).device
    tokens = prompt_tokens(tokenizer, prompt, alpaca)
    generated, shown = [], ""
    logits = last_position_logits(model, trunk)
    for token in greedy(model, logits, tokens, max_new_tokens, tokenizer.stop_tokens, device):
        generated.append(token)
        text = tokenizer.decode(generated)
        out.write(text[len(shown) :])
        out.flush()
        shown = text
    out.write("\n")
    return generated


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--prompt", help="answer this and exit (default: interactive chat)")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoints/step_N folder (default: the newest)")
    parser.add_argument("--merged", action="store_true", help="load the merged model instead of base + adapter")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--print-token-ids", action="store_true", help="print the generated token ids at the end")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(["--config", args.config, *overrides])
        settings.parse(cfg, args.config)  # the same typo and value checks as training
        tokenizer = config.instantiate(cfg.tokenizer)
        model, trunk = load_model(cfg, args.checkpoint, args.merged)
    except UserError as e:
        return fail(str(e))
    alpaca = uses_alpaca(cfg)
    while True:
        if args.prompt is None:
            try:
                prompt = input("you> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            sys.stdout.write("model> ")
        else:
            prompt = args.prompt
        ids = answer(tokenizer, model, trunk, prompt, args.max_new_tokens, alpaca)
        if args.print_token_ids:
            print("token ids:", " ".join(map(str, ids)))
        if args.prompt is not None:
            return 0


if __name__ == "__main__":
    sys.exit(main())
