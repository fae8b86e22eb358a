"""A torchtune decoder used in two explicit parts: hidden states, then the output layer where it is needed.

``TransformerDecoder.forward`` ends with the output layer on every position: a [batch, seq, vocabulary] matmul,
128k wide for Llama 3, which is most of a step's cost on short rows. Training needs logits only where a
label is, generation only at the last position. ``Trunk`` runs the decoder's own modules up to the final norm;
the caller applies ``decoder.output`` to the hidden states it picks.
"""

import torch
from torch import nn
from torchtune.modules import TransformerDecoder


class Trunk(nn.Module):
    """The decoder without its output layer: token embeddings, transformer layers, final norm.

    It holds the decoder's own modules (nothing is copied), under the decoder's names, so parameters and
    state-dict keys are the same. The output layer is registered too when it is a module (an untied head,
    which may carry LoRA) although ``forward`` does not call it: then FSDP, sharding this module as the root,
    keeps the head's weights in the same unit as the embeddings, gathered until backward is done.
    """

    def __init__(self, decoder: TransformerDecoder):
        super().__init__()
        self.tok_embeddings = decoder.tok_embeddings
        self.layers = decoder.layers
        self.norm = decoder.norm
        if isinstance(decoder.output, nn.Module):
            self.output = decoder.output

    def forward(self, tokens: torch.Tensor, *, mask=None, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """[b, s] token ids -> [b, s, d] normalised hidden states. ``mask`` and ``input_pos`` as for the decoder
        (a block mask and per-sample positions for packed rows; positions and a mask with a KV cache)."""
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, mask=mask, input_pos=input_pos)
        return self.norm(h)


def loss_sum(trunk, head, loss_fn, batch: dict[str, torch.Tensor], activations_ctx) -> tuple[torch.Tensor, ...]:
    """Sum of the per-token losses of one batch, and how many tokens it trains on.

    Labels arrive already shifted (see lora_tools.data.batching), so position i's label is token i+1. The output
    layer runs on the labelled positions only: prompts and padding cost nothing more. ``activations_ctx``
    wraps the trunk (activation offloading, or nothing). lora_tools.memory traces this same function.
    """
    batch = dict(batch)
    labels = batch.pop("labels")
    with activations_ctx:
        hidden = trunk(**batch)  # [b, s, d], after the final norm
    trained = labels != loss_fn.ignore_index
    hidden, labels = hidden[trained], labels[trained]  # [n, d], [n]
    n_tokens = torch.tensor(labels.numel(), device=hidden.device)
    if labels.numel() == 0:
        # Nothing to learn from. The head still runs (on no rows) so that an untied head's LoRA gets a zero
        # gradient rather than none: sharded, every process must reduce the same gradients.
        return head(hidden).sum() * 0.0, n_tokens
    chunks = getattr(loss_fn, "num_output_chunks", 0)
    if chunks:  # chunked cross-entropy: logits of one chunk at a time, upcast to fp32 inside the loss
        logits = [head(h) for h in hidden.unsqueeze(0).chunk(chunks, dim=1)]
        loss = loss_fn(logits, labels.unsqueeze(0))
    else:
        loss = loss_fn(head(hidden).float(), labels)
    return loss * labels.numel(), n_tokens
