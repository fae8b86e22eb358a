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
