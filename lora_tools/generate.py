"""Try the finetuned model: greedy answers, streamed to the terminal, to prompts in its training data's format.

    python -m lora_tools.generate --config configs/tiny.yaml --prompt "What color is the lemon?"
    python -m lora_tools.generate --config lora_finetune_single_device.yaml          # interactive chat
    python -m lora_tools.generate --config configs/tiny_chat.yaml --system "Answer in one short sentence."
    python -m lora_tools.generate --config ... --checkpoint outputs/.../step_0000500 --merged
    python -m lora_tools.generate --config configs/tiny_tools.yaml --tools tools.json --prompt "What color is the plum?"

A config whose dataset is built by lora_tools.data.sft formats the conversation with the chat template that
dataset renders (the base model's own), as a server would; interactive chat keeps the conversation's turns.
By default it loads the base model named by the config plus the adapter of the newest checkpoint under
output_dir (--checkpoint picks another; --merged loads that checkpoint's merged model instead). Extra key=value
arguments override the config as with `tune run` (e.g. device=cpu).

With tool schemas (--tools FILE, or the dataset's tools file) prompts carry them as the chat template writes them.
An answer that is a tool call is printed again as the structured call (OpenAI's tool_calls form); no tool is run.
In interactive chat you then type the tool's result, and the model answers from it.
"""

import argparse
import json
import sys
from pathlib import Path

from torchtune import config

from lora_tools.config import loader
from lora_tools.data import records
from lora_tools.data.sft import read_tools
from lora_tools.errors import UserError, fail
from lora_tools.eval.inference import PromptFormat, greedy, last_position_logits, load_model


def answer(tokenizer, model, trunk, tokens: list[int], max_new_tokens: int, out=None) -> list[int]:
    """Stream one greedy answer to the prompt ``tokens`` to ``out`` (stdout); returns its token ids."""
    out = out or sys.stdout
    device = next(model.parameters()).device
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
    parser.add_argument("--system", help="a system message before the conversation")
    parser.add_argument("--tools", help="a JSON file of tool schemas the prompts carry (default: the dataset's)")
    parser.add_argument("--print-prompt-ids", action="store_true", help="print the prompt's token ids first")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoints/step_N folder (default: the newest)")
    parser.add_argument("--merged", action="store_true", help="load the merged model instead of base + adapter")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--print-token-ids", action="store_true", help="print the generated token ids at the end")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = loader.load(["--config", args.config, *overrides]).cfg  # the same typo and value checks as training
        tokenizer = config.instantiate(cfg.tokenizer)
        prompts = PromptFormat(cfg, tokenizer)
        if args.tools:
            prompts.tools = read_tools(args.tools, "--tools")
        model, trunk = load_model(cfg, args.checkpoint, args.merged)
    except UserError as e:
        return fail(str(e))
    conversation = [{"role": "system", "content": args.system}] if args.system else []
    interactive = args.prompt is None
    while True:
        prompt = _ask("you> ") if interactive else args.prompt
        if prompt is None:
            return 0
        conversation.append({"role": "user", "content": prompt})
        while True:  # answers; after a tool call, the tool's result (typed in) and the answer to it
            try:
                tokens = prompts.tokens(conversation)
            except UserError as e:
                return fail(str(e))
            if args.print_prompt_ids:
                print("prompt ids:", " ".join(map(str, tokens)))
            if interactive:
                sys.stdout.write("model> ")
            ids = answer(tokenizer, model, trunk, tokens, args.max_new_tokens)
            if args.print_token_ids:
                print("token ids:", " ".join(map(str, ids)))
            text = tokenizer.decode(ids)
            call = records.call_in_text(text) if prompts.tools else None
            if call is None:
                conversation.append({"role": "assistant", "content": text})
                break
            print("tool call (not run):", json.dumps({"tool_calls": [call]}, ensure_ascii=False))
            conversation.append({"role": "assistant", "content": "", "tool_calls": [call]})
            result = _ask("tool result> ") if interactive else None
            if result is None:
                return 0
            conversation.append({"role": "tool", "content": result})
        if not interactive:
            return 0


def _ask(label: str) -> str | None:
    """A line typed at the terminal; None at its end (Ctrl-D) or on Ctrl-C."""
    try:
        return input(label)
    except (EOFError, KeyboardInterrupt):
        print()
        return None


if __name__ == "__main__":
    sys.exit(main())
