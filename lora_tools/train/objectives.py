"""What a training step minimizes: next-token cross-entropy (SFT), or a preference loss on pairs (DPO, ORPO).

The config chooses one; without an ``objective`` section the run is SFT with the config's ``loss``:

    objective:
      _component_: lora_tools.train.objectives.DPO   # or lora_tools.train.objectives.ORPO
      beta: 0.1

An objective sees one micro-batch at a time, but its loss is a mean over the whole optimizer step (every
micro-batch and every process): ``counts`` gives what the step's means divide by before any forward pass, the
recipe adds them up, and ``__call__`` returns this micro-batch's share of the step's loss, to backward at once.
So ``batch_size=b, gradient_accumulation_steps=2`` updates as ``batch_size=2b`` does, for every objective.

Preference batches hold ``2 x b`` rows: the b chosen sequences, then the b rejected ones (lora_tools.data.batching).
Only response tokens carry labels, so a sequence's log-probability is the sum over its response and end-of-turn
tokens. Metric names are TRL's (rewards/chosen, logps/rejected, ...), so dashboards of both line up.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchtune.modules.peft import disable_adapter

from lora_tools.errors import UserError
from lora_tools.train.decoder import loss_sum


@dataclass
class ModelParts:
    """What an objective runs: the decoder (for switching its adapters off), its trunk and output layer, and the
    context the trunk runs in (activation offloading, or nothing)."""

    model: nn.Module
    trunk: Any
    head: Any
    activations: Any


Sums = dict[str, torch.Tensor]


class SFT:
    """Mean cross-entropy over every trained token of the step: the config's ``loss``."""

    pairs = False
    requires_reference = False

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn
        self.ignore_index = loss_fn.ignore_index

    def counts(self, batch: dict[str, torch.Tensor]) -> Sums:
        return {"tokens": (batch["labels"] != self.ignore_index).sum()}

    def __call__(self, parts: ModelParts, batch, totals: Sums) -> tuple[torch.Tensor, Sums]:
        total, _ = loss_sum(parts.trunk, parts.head, self.loss_fn, batch, parts.activations)
        return total / totals["tokens"].clamp(min=1), {"loss": total.detach()}

    def reduce(self, sums: Sums, totals: Sums) -> dict[str, float]:
        return {"loss": (sums["loss"] / totals["tokens"].clamp(min=1)).item()}


def response_logps(parts: ModelParts, batch: dict[str, torch.Tensor], ignore_index: int, whole_chosen: bool = False):
    """Per row: the summed log-probability of its labelled (response) tokens, and how many there are.

    The output layer runs on labelled positions only. With ``whole_chosen`` it also returns the summed
    log-probability and count of every real token of the chosen rows (the prompt too), for ORPO's TRL form.
    """
    labels, tokens = batch["labels"], batch["tokens"]
    with parts.activations:
        hidden = parts.trunk(tokens=tokens)  # [2b, s, d]
    trained = labels != ignore_index
    picked = trained
    if whole_chosen:  # position i predicts token i + 1, for every real token after the first
        b = tokens.shape[0] // 2
        real = torch.arange(tokens.shape[1], device=tokens.device) < (batch["lengths"][:, None] - 1)
        picked = trained | (real & (torch.arange(tokens.shape[0], device=tokens.device) < b)[:, None])
    targets = torch.where(trained, labels, tokens.roll(-1, dims=1))[picked]
    token_logps = _token_logps(parts.head, hidden[picked], targets)
    rows, zeros = picked.nonzero()[:, 0], torch.zeros(tokens.shape[0], device=hidden.device)
    counts = trained.sum(dim=1)
    if not whole_chosen:
        return zeros.index_add(0, rows, token_logps), counts
    sums = zeros.index_add(0, rows, token_logps * trained[picked])
    return sums, counts, zeros.index_add(0, rows, token_logps), picked.sum(dim=1)


LOGIT_CHUNK = 1024  # positions whose fp32 logits (x vocabulary) exist at once: 0.5 GiB for Llama 3's 128k


def _token_logps(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position: the output layer and its fp32 log-softmax a chunk of positions at a time,
    recomputed in backward rather than kept (one chunk's logits alive, not all of them)."""

    def chunk(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(head(h).float(), t, reduction="none")

    if hidden.shape[0] <= LOGIT_CHUNK:
        return chunk(hidden, targets)
    pieces = zip(hidden.split(LOGIT_CHUNK), targets.split(LOGIT_CHUNK), strict=True)
    grad = torch.is_grad_enabled()
    return torch.cat([checkpoint(chunk, h, t, use_reentrant=False) if grad else chunk(h, t) for h, t in pieces])


class _Preference:
    """What DPO and ORPO share: pairs counted by their chosen row (a pair that only pads a process's share of
    the validation set has no label), metrics summed over pairs."""

    pairs = True

    def __init__(self, beta: float):
        self.beta = beta
        self.ignore_index = -100

    def _real(self, batch) -> torch.Tensor:
        b = batch["tokens"].shape[0] // 2
        return (batch["labels"][:b] != self.ignore_index).any(dim=1)

    def counts(self, batch) -> Sums:
        return {"pairs": self._real(batch).sum(), "tokens": (batch["labels"] != self.ignore_index).sum()}

    def _pair_metrics(self, real, chosen_rewards, rejected_rewards, chosen, rejected, per_pair_loss) -> Sums:
        w = real.float()
        return {
            "loss_sum": (per_pair_loss.detach() * w).sum(),
            "rewards/chosen": (chosen_rewards * w).sum(),
            "rewards/rejected": (rejected_rewards * w).sum(),
            "rewards/accuracies": ((chosen_rewards > rejected_rewards).float() * w).sum(),
            "rewards/margins": ((chosen_rewards - rejected_rewards) * w).sum(),
            "logps/chosen": (chosen.detach() * w).sum(),
            "logps/rejected": (rejected.detach() * w).sum(),
            # the model's own preference: its log-probability of the chosen response above the rejected one's
            "preference_accuracy": ((chosen > rejected).float() * w).sum(),
            "preference_margin": ((chosen - rejected).detach() * w).sum(),
        }

    def reduce(self, sums: Sums, totals: Sums) -> dict[str, float]:
        pairs = totals["pairs"].clamp(min=1)
        out = {k: (v / pairs).item() for k, v in sums.items() if k not in ("loss_sum", "nll_sum")}
        out["loss"] = (sums["loss_sum"] / pairs).item()
        return out


class DPO(_Preference):
    """Direct Preference Optimization (Rafailov et al. 2023), the sigmoid loss with optional label smoothing
    (conservative DPO): ``-(1-ε) log σ(β h) - ε log σ(-β h)``, ``h`` the chosen-minus-rejected log-ratio of
    the policy to the reference.

    Args:
        beta: how far the policy may move from the reference (larger: closer); TRL's default 0.1.
        label_smoothing: the assumed share of pairs whose labels are flipped (0: plain DPO).
        precompute_reference: compute the reference log-probs once before training and keep them with the data
            (and in checkpoints), so no reference forward runs during training. The reference is then the model
            as training starts: base + a starting adapter if there is one.
        sft_weight: add this times the chosen responses' NLL (mean per token), TRL's ``loss_type=["sigmoid",
            "sft"]`` (RPO, Pang et al. 2024): DPO alone may lower the chosen answers' likelihood along with the
            rejected ones', so that greedy answers get worse while the preference metrics improve.
    """

    requires_reference = True

    def __init__(
        self,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        precompute_reference: bool = False,
        sft_weight: float = 0.0,
    ):
        super().__init__(beta)
        self.label_smoothing = label_smoothing
        self.precompute_reference = precompute_reference
        self.sft_weight = sft_weight

    def counts(self, batch) -> Sums:
        counts = super().counts(batch)
        counts["nll_tokens"] = (batch["labels"][: batch["tokens"].shape[0] // 2] != self.ignore_index).sum()
        return counts

    def reference_logps(self, parts: ModelParts, batch) -> torch.Tensor:
        """The reference's summed response log-probs per row: precomputed ones from the batch, or the model with
        its adapters switched off (the base), without gradients."""
        if "reference_logps" in batch:
            return batch["reference_logps"]
        with torch.no_grad(), disable_adapter(parts.model):
            return response_logps(parts, batch, self.ignore_index)[0]

    def __call__(self, parts: ModelParts, batch, totals: Sums) -> tuple[torch.Tensor, Sums]:
        reference = self.reference_logps(parts, batch)
        logps, _ = response_logps(parts, batch, self.ignore_index)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = reference.chunk(2)
        h = (chosen - ref_chosen) - (rejected - ref_rejected)
        eps = self.label_smoothing
        per_pair = -(1 - eps) * F.logsigmoid(self.beta * h) - eps * F.logsigmoid(-self.beta * h)
        real = self._real(batch)
        nll = -chosen.sum()  # the chosen responses' tokens (a padding pair has none)
        loss = (per_pair * real).sum() / totals["pairs"].clamp(min=1)
        if self.sft_weight:
            loss = loss + self.sft_weight * nll / totals["nll_tokens"].clamp(min=1)
        chosen_rewards = self.beta * (chosen - ref_chosen).detach()
        rejected_rewards = self.beta * (rejected - ref_rejected).detach()
        metrics = self._pair_metrics(real, chosen_rewards, rejected_rewards, chosen, rejected, per_pair)
        return loss, {**metrics, "nll_sum": nll.detach()}

    def reduce(self, sums: Sums, totals: Sums) -> dict[str, float]:
        out = super().reduce(sums, totals)
        out["nll_loss"] = (sums["nll_sum"] / totals["nll_tokens"].clamp(min=1)).item()
        out["loss"] += self.sft_weight * out["nll_loss"]
        return out


class ORPO(_Preference):
    """Odds Ratio Preference Optimization (Hong et al. 2024): no reference model; the chosen responses' NLL plus
    ``-β log σ(log odds(chosen) - log odds(rejected))``, odds from the mean log-prob per response token.

    Args:
        beta: the weight of the odds-ratio term (the paper's λ); TRL's default 0.1.
        nll_on_prompt: the NLL term also counts the prompt tokens of the chosen sequences, as TRL's ORPOTrainer
            computes it; False (the paper's form): the chosen responses only.
    """

    requires_reference = False

    def __init__(self, beta: float = 0.1, nll_on_prompt: bool = False):
        super().__init__(beta)
        self.nll_on_prompt = nll_on_prompt

    def counts(self, batch) -> Sums:
        counts = super().counts(batch)
        b = batch["tokens"].shape[0] // 2
        if self.nll_on_prompt:
            counts["nll_tokens"] = (batch["lengths"][:b] - 1).clamp(min=0).sum()
        else:
            counts["nll_tokens"] = (batch["labels"][:b] != self.ignore_index).sum()
        return counts

    def __call__(self, parts: ModelParts, batch, totals: Sums) -> tuple[torch.Tensor, Sums]:
        b = batch["tokens"].shape[0] // 2
        if self.nll_on_prompt:
            sums, n, whole, _ = response_logps(parts, batch, self.ignore_index, whole_chosen=True)
            nll = -whole[:b].sum()
        else:
            sums, n = response_logps(parts, batch, self.ignore_index)
            nll = -sums[:b].sum()
        chosen, rejected = (sums / n.clamp(min=1)).chunk(2)  # mean log-prob per response token
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        real = self._real(batch)
        or_term = (self.beta * ratio * real).sum()
        loss = nll / totals["nll_tokens"].clamp(min=1) - or_term / totals["pairs"].clamp(min=1)
        metrics = self._pair_metrics(real, self.beta * chosen.detach(), self.beta * rejected.detach(), chosen, rejected,
                                     -self.beta * ratio)  # fmt: skip
        w = real.float()
        metrics.update(
            nll_sum=nll.detach(),
            log_odds_ratio=(ratio.detach() * w).sum(),
            log_odds_chosen=(log_odds.detach() * w).sum(),
        )
        return loss, metrics

    def reduce(self, sums: Sums, totals: Sums) -> dict[str, float]:
        out = super().reduce(sums, totals)
        out["nll_loss"] = (sums["nll_sum"] / totals["nll_tokens"].clamp(min=1)).item()
        out["loss"] = out["nll_loss"] + out["loss"]  # the odds-ratio term's mean, -β log σ(...), plus the NLL
        return out


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def build(objective_cfg, loss_fn):
    """The config's objective (a DPO or ORPO instance from ``config.instantiate``), or SFT on ``loss_fn``."""
    if objective_cfg is None:
        return SFT(loss_fn)
    from torchtune import config

    objective = config.instantiate(objective_cfg)
    objective.ignore_index = loss_fn.ignore_index
    return objective


def add_up(parts) -> Sums:
    """Key by key, the sum of several dicts of tensors (a step's micro-batches)."""
    total: Sums = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total[key] + value if key in total else value
    return total


def summed(parts, strategy) -> Sums:
    """Key by key, the sum over several dicts of tensors (a step's micro-batches) and over every process."""
    return {key: strategy.sum(value) for key, value in add_up(parts).items()}


def check_data_fits(objective, built, name: str) -> None:
    """Preference objectives train on pairs, SFT on single sequences: a mismatch is one line before any weights."""
    if objective.pairs and not built.pairs:
        raise UserError(
            f"{name}: {type(objective).__name__} trains on preference pairs, but {name} gives single sequences; "
            "use lora_tools.data.preference.preference_dataset (prompt, chosen, rejected)"
        )
    if built.pairs and not objective.pairs:
        raise UserError(
            f"{name} gives preference pairs but no objective is set (SFT); add "
            "objective._component_=lora_tools.train.objectives.DPO (or ORPO)"
        )
