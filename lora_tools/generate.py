"""Try the finetuned model: greedy generation with the Llama 3 instruct chat template, streamed to the terminal.

    python -m lora_tools.generate --config configs/tiny.yaml --prompt "What color is the lemon?"
    python -m lora_tools.generate --config lora_finetune_single_device.yaml          # interactive chat
    python -m lora_tools.generate --config ... --checkpoint outputs/.../step_0000500 --merged

By default it loads the base model named by the config plus the adapter of the newest checkpoint under
output_dir (--checkpoint picks another; --merged loads that checkpoint's merged model instead). Extra key=value
arguments override the config as with `tune run` (e.g. device=cpu).
"""

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune import config, training, utils
from torchtune.data import AlpacaToMessages, Message
from torchtune.modules.common_utils import local_kv_cache

from lora_tools import checkpointing, preflight
from lora_tools.errors import UserError
from lora_tools.launch import fail, load_config

log = utils.get_logger("INFO")


def load_model(cfg: DictConfig, checkpoint: Path | None, merged: bool) -> torch.nn.Module:
    """The config's model with base weights + the checkpoint's adapter (or the merged weights), in eval mode."""
    preflight.check_device(cfg)
    preflight.check_model_files(cfg)
    device = utils.get_device(cfg.device)
    dtype = training.get_dtype(cfg.dtype, device=device)
    checkpoint = checkpoint or checkpointing.latest_checkpoint(cfg.output_dir)
    if checkpoint is None:
        raise UserError(f"no checkpoint under {cfg.output_dir}/checkpoints; train first or pass --checkpoint")
    needed = checkpoint / ("model/model.safetensors" if merged else checkpointing.RECIPE_STATE)
    if not needed.is_file():
        hint = " (it was saved with save_adapter_weights_only; drop --merged)" if merged else ""
        raise UserError(f"{needed} does not exist{hint}; pass a checkpoints/step_N folder with --checkpoint")
    ckpt_cfg = OmegaConf.merge(cfg.checkpointer, {"output_dir": str(Path(cfg.output_dir) / "generate")})
    if merged:
        ckpt_cfg = OmegaConf.merge(ckpt_cfg, {"checkpoint_dir": str(checkpoint / "model")})
        ckpt_cfg.checkpoint_files = ["model.safetensors"]
    with training.set_default_dtype(dtype), device:
        model = config.instantiate(cfg.model)
    model.load_state_dict(config.instantiate(ckpt_cfg).load_checkpoint()["model"], strict=False)
    if not merged:
        state = torch.load(checkpoint / checkpointing.RECIPE_STATE, map_location="cpu", weights_only=False)
        model.load_state_dict(state["adapter"], strict=False)
    else:
        # The merged weights already hold the update: make the adapters a no-op so it is not applied twice.
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.data.zero_()
        for m in model.modules():
            if hasattr(m, "initialize_dora_magnitude"):
                m.initialize_dora_magnitude()
    return model.to(device).eval()


def prompt_tokens(tokenizer, prompt: str, alpaca: bool = False) -> list[int]:
    """Llama 3 instruct template: the user turn, then the assistant header, ready for the answer.

    With ``alpaca`` the user turn is first wrapped in the alpaca instruction prompt, as the alpaca datasets
    format every training sample, so the model sees what it was trained on.
    """
    if alpaca:
        user = AlpacaToMessages()({"instruction": prompt, "input": "", "output": ""})["messages"][0]
    else:
        user = Message(role="user", content=prompt)
    tokens, _ = tokenizer.tokenize_messages([user, Message(role="assistant", content="")], add_end_tokens=False)
    return tokens


def uses_alpaca(cfg: DictConfig) -> bool:
    """Whether the config trains on an alpaca-format dataset (so prompts should be wrapped the same way)."""
    datasets = cfg.dataset if isinstance(cfg.dataset, ListConfig) else [cfg.dataset]
    return any("alpaca" in str(d.get("_component_", "")) for d in datasets)


@torch.no_grad()
def greedy(
    model, tokens: list[int], max_new_tokens: int, stop_tokens: list[int], forward=None, device=None
) -> Iterator[int]:
    """Yield greedily chosen tokens one by one, with a KV cache that exists only during the call.

    ``forward`` maps (tokens, input_pos, mask) to logits; the default is the model itself (the training recipe
    passes its own, since its model stops at the final norm). ``device``: where the model computes, when its
    parameters live elsewhere (FSDP's CPU offload); the default is the parameters' device.
    """
    forward = forward or model
    param = next(model.parameters())
    device = device or param.device
    total = len(tokens) + max_new_tokens
    causal = torch.tril(torch.ones(total, total, dtype=torch.bool, device=device))
    positions = torch.arange(total, device=device)
    with local_kv_cache(model, batch_size=1, device=device, dtype=param.dtype, decoder_max_seq_len=total):
        n = len(tokens)
        step_input = torch.tensor([tokens], device=device)
        logits = forward(step_input, input_pos=positions[None, :n], mask=causal[None, :n])
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            if token in stop_tokens:
                return
            yield token
            step_input = torch.tensor([[token]], device=device)
            logits = forward(step_input, input_pos=positions[None, n : n + 1], mask=causal[None, n : n + 1])
            n += 1


def log_samples(metric_logger, step: int, rows: list[tuple[str, str]]) -> None:
    """Sample answers: a W&B table when W&B is the logger, lines in the log otherwise."""
    if type(metric_logger).__name__ == "WandBLogger":
        import wandb

        table = wandb.Table(columns=["step", "prompt", "answer"], data=[[step, p, a] for p, a in rows])
        wandb.log({"samples": table, "global_step": step})  # torchtune's WandBLogger steps by global_step too
        return
    for prompt, answer in rows:
        log.info(f"sample at step {step} | {prompt!r} -> {answer!r}")


def stream(tokenizer, model, prompt: str, max_new_tokens: int, alpaca: bool, out=sys.stdout) -> list[int]:
    generated, shown = [], ""
    for token in greedy(model, prompt_tokens(tokenizer, prompt, alpaca), max_new_tokens, tokenizer.stop_tokens):
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
        tokenizer = config.instantiate(cfg.tokenizer)
        model = load_model(cfg, args.checkpoint, args.merged)
    except UserError as e:
        return fail(str(e))
    prompts = [args.prompt] if args.prompt is not None else None
    while True:
        if prompts is None:
            try:
                prompt = input("you> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            sys.stdout.write("model> ")
        else:
            if not prompts:
                return 0
            prompt = prompts.pop()
        ids = stream(tokenizer, model, prompt, args.max_new_tokens, uses_alpaca(cfg))
        if args.print_token_ids:
            print("token ids:", " ".join(map(str, ids)))


if __name__ == "__main__":
    sys.exit(main())
