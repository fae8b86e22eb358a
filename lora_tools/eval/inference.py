"""Answering prompts with a finetuned model: the prompt in the format it trained on, and greedy decoding.

Used by the recipe (sample answers during training) and by ``python -m lora_tools.generate``; both decode
through the same hidden-states-then-output-layer path as training (lora_tools.train.decoder), the output layer on
the last position only.
"""

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils
from torchtune.data import AlpacaToMessages, Message
from torchtune.modules.common_utils import local_kv_cache

from lora_tools import checkpoints
from lora_tools.config import preflight
from lora_tools.config.settings import as_list
from lora_tools.data.chat_template import ChatFormat
from lora_tools.data.sft import own_data_section
from lora_tools.errors import UserError
from lora_tools.train.decoder import Trunk
from lora_tools.train.model import eager, is_qlora

# (tokens [1, n], input_pos [1, n], mask [1, n, total]) -> logits of the last position [vocabulary]
NextTokenLogits = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class PromptFormat:
    """Prompts in the format the training data had, so the model is asked the way it learned to answer.

    Datasets built by lora_tools.data.sft: the chat template they render with (and an instruction dataset's
    system prompt, and the dataset's tools file), so a prompt here equals
    ``apply_chat_template(messages, tools=tools, add_generation_prompt=True)``.
    torchtune's datasets: its Llama 3 format, each user turn wrapped in the alpaca prompt for alpaca data.
    """

    def __init__(self, cfg: DictConfig, tokenizer):
        first = as_list(cfg.dataset)[0]
        self._tokenizer = tokenizer
        self._chat, self._system, self._alpaca = None, None, "alpaca" in str(first.get("_component_", ""))
        self.tools = None  # the tool schemas every prompt carries: the dataset's tools file, or --tools
        own = own_data_section(cfg)
        if own is not None:
            self._system, self.tools = own.system_prompt, own.tools
            self._chat = ChatFormat(tokenizer, own.chat_template, own.chat_template_kwargs)
        # What the prompts look like, in a word (recorded with evaluation results).
        self.name = "chat_template" if self._chat else ("llama3+alpaca" if self._alpaca else "llama3")

    def tokens(self, messages: list[dict]) -> list[int]:
        """The conversation so far, ending with the assistant header, ready for the answer."""
        if self._chat is not None:
            if self._system and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self._system}, *messages]
            return self._chat.prompt(messages, self.tools)
        if self.tools:
            raise UserError(
                "tools need a dataset built by lora_tools.data.sft (the model's chat template); torchtune's Llama 3 "
                "format has no place for tool schemas"
            )
        turns = []
        for m in messages:
            if m["role"] == "user" and self._alpaca:
                turns.append(
                    AlpacaToMessages()({"instruction": m["content"], "input": "", "output": ""})["messages"][0]
                )
            else:
                turns.append(Message(role=m["role"], content=m["content"]))
        turns.append(Message(role="assistant", content=""))
        tokens, _ = self._tokenizer.tokenize_messages(turns, add_end_tokens=False)
        return tokens


def last_position_logits(decoder, trunk: Trunk) -> NextTokenLogits:
    def logits(tokens, input_pos, mask):
        return decoder.output(trunk(tokens, input_pos=input_pos, mask=mask)[:, -1])[0]

    return logits


@torch.no_grad()
def greedy(
    decoder, logits: NextTokenLogits, tokens: list[int], max_new_tokens: int, stop_tokens: list[int], device
) -> Iterator[int]:
    """Yield greedily chosen tokens one by one, with a KV cache that exists only during the call. A compiled
    model runs uncompiled here (see lora_tools.train.model.eager)."""
    dtype = next(decoder.parameters()).dtype
    total = len(tokens) + max_new_tokens
    causal = torch.tril(torch.ones(total, total, dtype=torch.bool, device=device))
    positions = torch.arange(total, device=device)

    def next_logits(ids: list[int], start: int) -> torch.Tensor:  # ids at positions start, start + 1, ...
        end = start + len(ids)
        with eager():
            return logits(torch.tensor([ids], device=device), positions[None, start:end], causal[None, start:end])

    with local_kv_cache(decoder, batch_size=1, device=device, dtype=dtype, decoder_max_seq_len=total):
        n, scores = len(tokens), next_logits(tokens, 0)
        for _ in range(max_new_tokens):
            token = int(scores.argmax())
            if token in stop_tokens:
                return
            yield token
            scores = next_logits([token], n)
            n += 1


def load_model(cfg: DictConfig, checkpoint: Path | None, merged: bool) -> tuple[torch.nn.Module, Trunk]:
    """The config's model with base weights + the checkpoint's adapter (or the merged weights), in eval mode."""
    preflight.check_device(cfg)
    preflight.check_model_files(cfg)
    device = utils.get_device(cfg.device)
    dtype = training.get_dtype(cfg.dtype, device=device)
    checkpoint = checkpoints.resolve(cfg.output_dir, checkpoint, merged)
    ckpt_cfg = OmegaConf.merge(cfg.checkpointer, {"output_dir": str(Path(cfg.output_dir) / "generate")})
    if merged:
        ckpt_cfg = OmegaConf.merge(ckpt_cfg, {"checkpoint_dir": str(checkpoint / checkpoints.MERGED)})
        ckpt_cfg.checkpoint_files = ["model.safetensors"]
    unquantized = {"quantize_base": False} if merged and is_qlora(cfg.model) else {}  # merged: plain weights
    with training.set_default_dtype(dtype), device:
        model = config.instantiate(cfg.model, **unquantized)
    model.load_state_dict(config.instantiate(ckpt_cfg).load_checkpoint()[training.MODEL_KEY], strict=False)
    if merged:  # the merged weights already hold the update: make the adapters a no-op so it is not applied twice
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.data.zero_()
        for m in model.modules():
            if hasattr(m, "initialize_dora_magnitude"):
                m.initialize_dora_magnitude()
    else:
        model.load_state_dict(checkpoints.load_recipe_state(checkpoint)["adapter"], strict=False)
    model = model.to(device).eval()
    return model, Trunk(model)
