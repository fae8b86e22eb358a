"""Peak GPU memory of one training step, found without a GPU and without reading any weights.

The model is built from the config with no storage (the meta device, then fake tensors: shapes, dtypes and
sizes, no data), set up as the recipe sets it up (compile, activation checkpointing of some or all layers,
offloading), and one training step (the recipe's own loss, ``lora_tools.train.decoder.loss_sum``, backward and the
optimizer step, after an optimizer step on zero gradients that creates its state, as a second step finds it)
runs on it while a dispatch mode adds up the bytes of every tensor storage alive. Compiled layers and loss are
traced by Dynamo with the partitioner inductor uses (backend ``aot_eager_decomp_partition``), so the activations
kept for backward are the ones the compiled step keeps, not the eager ones. Offloading is replayed with the rule of
torchtune's ``OffloadActivations``: a saved tensor of 1 KiB or more that is not a parameter leaves the GPU in
forward and comes back for backward.

What a trace cannot see, added as ``allocator overhead``: the CUDA caching allocator's reserved-but-unused
blocks and the CUDA context (see OVERHEAD_FRACTION).
"""

import contextlib
import dataclasses
import math
import os
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torchtune import config, training
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from lora_tools.train import objectives
from lora_tools.train.decoder import Trunk
from lora_tools.train.model import is_qlora, meta_model, prepare

GIB = 2**30
# Reserved minus allocated on the H200 runs in bench/results was 0.7-2.6 GiB (4-18% of the peak);
# the CUDA context takes about 0.5 GiB more. tests/unit/test_memory_plan.py checks these cover every run.
OVERHEAD_FRACTION, OVERHEAD_FIXED = 0.15, 1 * GIB
# The compile backend that partitions forward and backward as inductor does, but runs the graphs op by op.
TRACE_BACKEND = "aot_eager_decomp_partition"
# torchao's NF4: 4 bits a value, an int8 scale per block of 64, an fp32 scale per 256 of those.
NF4_BYTES_PER_VALUE = 0.5 + 1 / 64 + 4 / (64 * 256)
OFFLOAD_MIN_BYTES = 1024  # torchtune's OffloadActivations leaves smaller tensors on the GPU

PARTS = ("base weights", "adapters + optimizer state", "activations", "output layer + loss")


@dataclass(frozen=True)
class Setting:
    """The memory-relevant choices of one candidate run."""

    batch_size: int
    gradient_accumulation_steps: int
    checkpointed_layers: int  # 0 .. number of layers
    offload: bool
    compile: bool
    compile_memory_budget: float | None = None  # torch._functorch.config.activation_memory_budget; None: 1

    def overrides(self, num_layers: int) -> list[str]:
        """The config keys (key=value) that select this setting."""
        ac = self.checkpointed_layers > 0
        keys = [
            f"batch_size={self.batch_size}",
            f"gradient_accumulation_steps={self.gradient_accumulation_steps}",
            f"enable_activation_checkpointing={ac}",
        ]
        if ac:
            count = "null" if self.checkpointed_layers == num_layers else self.checkpointed_layers
            keys.append(f"activation_checkpointing_layers={count}")
        keys.append(f"enable_activation_offloading={self.offload}")
        if self.compile_memory_budget is not None:
            keys.append(f"compile_memory_budget={self.compile_memory_budget}")
        return keys

    def describe(self, num_layers: int) -> str:
        k = self.checkpointed_layers
        ac = f"checkpointing {k} of {num_layers} layers" if k else "no checkpointing"
        offload = ", offloading" if self.offload else ""
        budget = "" if self.compile_memory_budget is None else f", compile memory budget {self.compile_memory_budget}"
        return f"batch {self.batch_size} x {self.gradient_accumulation_steps}, {ac}{offload}{budget}"


@dataclass
class Estimate:
    """Predicted memory of one setting: bytes by part at the moment of the peak."""

    setting: Setting
    parts: dict[str, int]
    gradient_bytes: int = 0  # of the trainable parameters

    @property
    def peak(self) -> int:
        """What ``torch.cuda.max_memory_allocated`` should report."""
        return sum(self.parts.values())

    @property
    def overhead(self) -> int:
        return int(self.peak * OVERHEAD_FRACTION) + OVERHEAD_FIXED

    @property
    def total(self) -> int:
        """What the GPU must have: the peak plus the allocator's and the CUDA context's overhead."""
        return self.peak + self.overhead


class LiveBytes(TorchDispatchMode):
    """Adds up the bytes of every tensor storage alive, by part, and remembers the largest total.

    A storage is counted when an op first returns it and dropped when Python frees it (fake storages are
    freed like real ones). ``ignore_compile_internals`` lets Dynamo compile while this mode is active; the
    compiled graphs then run under it, op by op.
    """

    def __init__(self):
        super().__init__()
        self._bytes: dict[int, tuple[int, str]] = {}  # storage id -> (bytes, part)
        self.by_part: Counter[str] = Counter()
        self.live = self.peak = 0
        self.peak_parts: dict[str, int] = {}
        self.part = "activations"
        self.paused = False
        self.nonzero = 0  # what aten.nonzero returns this many rows of (the trained positions of a batch)
        self.positions = 0  # the size of the one mask it answers for (batch x sequence)

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def count(self, tensor: torch.Tensor, part: str | None = None, size: int | None = None) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._bytes or self.paused:
            return
        size, part = storage.nbytes() if size is None else size, part or self.part
        self._bytes[key] = (size, part)
        self.by_part[part] += size
        self.live += size
        if self.live > self.peak:
            self.peak, self.peak_parts = self.live, dict(self.by_part)
        weakref.finalize(storage, self._drop, key)

    def move(self, tensor: torch.Tensor, part: str) -> None:
        """Count an existing storage under another part (a gradient once it is accumulated)."""
        key = id(tensor.untyped_storage())
        if key in self._bytes:
            size, old = self._bytes[key]
            self._bytes[key] = (size, part)
            self.by_part[old] -= size
            self.by_part[part] += size

    def _drop(self, key: int) -> None:
        size, part = self._bytes.pop(key, (0, ""))
        self.by_part[part] -= size
        self.live -= size

    @contextlib.contextmanager
    def counting_as(self, part: str) -> Iterator[None]:
        before, self.part = self.part, part
        try:
            yield
        finally:
            self.part = before

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.nonzero.default:  # how many positions train is data: the planner says
            if args[0].numel() != self.positions:
                raise NotImplementedError(f"the plan knows one mask (the labels), not {func} of {args[0].shape}")
            return torch.zeros(self.nonzero, args[0].dim(), dtype=torch.long, device=args[0].device)
        if func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            if any(i is not None and i.dtype == torch.bool and i.numel() != self.positions for i in args[1]):
                raise NotImplementedError("the plan knows one mask (the labels' trained positions), no other")
            rows = torch.zeros(self.nonzero, dtype=torch.long, device=args[0].device)
            indices = [(rows,) * i.dim() if i is not None and i.dtype == torch.bool else (i,) for i in args[1]]
            args = (args[0], [j for i in indices for j in i], *args[2:])
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.count(t)
        return out


class ReplayOffloading(torch.autograd.graph.saved_tensors_hooks):
    """torchtune's activation offloading, as memory sees it: a saved activation (1 KiB or more, not a
    parameter or buffer) is copied off the GPU in forward, so only other references keep its GPU storage; it is
    copied back when backward needs it."""

    def __init__(self, live: LiveBytes):
        def pack(t: torch.Tensor):
            if t.nbytes < OFFLOAD_MIN_BYTES or isinstance(t, nn.Parameter | nn.Buffer):
                return t
            live.paused = True  # the host copy is not GPU memory
            try:
                host = torch.empty_like(t)
            finally:
                live.paused = False
            return (host,)

        def unpack(packed):
            return packed[0].clone() if isinstance(packed, tuple) else packed

        super().__init__(pack, unpack)


def fake_model(model_cfg, dtype: torch.dtype, fake: FakeTensorMode) -> nn.Module:
    """The configured model with fake weights: built on meta, given fake CPU storage; LoRA params train."""
    model = meta_model(model_cfg, dtype)
    with fake:
        model.to_empty(device="cpu")
        for module in model.modules():
            if hasattr(module, "rope_init"):  # RoPE's cache is computed from data: compute it, then fake it
                with unset_fake_temporarily():
                    module.rope_init()
                for name, buf in list(module.named_buffers(recurse=False)):
                    module.register_buffer(name, fake.from_tensor(buf), persistent=False)
    set_trainable_params(model, get_adapter_params(model))
    return model


def fake_batch(rows: int, seq_len: int, trained: int, ignore_index: int, pairs: bool = False) -> dict:
    """Token ids of one micro-batch and labels where the first ``trained`` positions carry a label; for preference
    pairs (``rows`` = 2 x pairs) also every row's length."""
    labels = torch.full((rows * seq_len,), ignore_index, dtype=torch.long)
    labels[:trained] = 0
    batch = {"tokens": torch.zeros(rows, seq_len, dtype=torch.long), "labels": labels.view(rows, seq_len)}
    return {**batch, "lengths": torch.full((rows,), seq_len)} if pairs else batch


_traced: dict[tuple, Estimate] = {}  # what this process already traced (the plan and the tests ask again)


def estimate(cfg, setting: Setting, seq_len: int, trained_fraction: float = 1.0) -> Estimate:
    """Predicted peak memory of training ``cfg`` (checked RecipeSettings) with ``setting``.

    ``seq_len`` is the longest row a batch can have; ``trained_fraction`` the share of its positions that carry
    a label (the output layer runs on those only).
    """
    # Everything the trace reads. Gradient accumulation is added after: one micro-batch is traced, and from the
    # second on, the adapters' gradients of the earlier ones are alive throughout.
    read = {"m": cfg.model, "l": cfg.loss, "o": cfg.optimizer, "objective": cfg.objective}
    sections = OmegaConf.to_yaml(OmegaConf.create(read))
    key = (sections, cfg.dtype, dataclasses.replace(setting, gradient_accumulation_steps=1), seq_len, trained_fraction)
    if key not in _traced:
        _traced[key] = _trace(cfg, setting, seq_len, trained_fraction)
    traced = _traced[key]
    parts = dict(traced.parts)
    if setting.gradient_accumulation_steps > 1:
        parts["adapters + optimizer state"] += traced.gradient_bytes
    return dataclasses.replace(traced, setting=setting, parts=parts)


def compile_budget(share: float | None) -> contextlib.AbstractContextManager:
    """torch._functorch.config.activation_memory_budget at ``share`` while the context is open: compile's
    partitioner reads it when a training graph compiles. None leaves it as it is (1: keep every activation)."""
    if share is None:
        return contextlib.nullcontext()
    return torch._functorch.config.patch(activation_memory_budget=share)


def _trace(cfg, setting: Setting, seq_len: int, trained_fraction: float) -> Estimate:
    """``_trace_step`` with torchtune's compile helpers pointed at the tracing backend and compile's budget set."""
    torch._dynamo.reset()  # compiled code of an earlier estimate was traced with other settings
    backend = os.environ.get("TORCH_COMPILE_BACKEND")
    os.environ["TORCH_COMPILE_BACKEND"] = TRACE_BACKEND  # read by torchtune's compile_model and compile_loss
    budget = 1.0 if setting.compile_memory_budget is None else setting.compile_memory_budget
    try:
        with compile_budget(budget):
            return _trace_step(cfg, setting, seq_len, trained_fraction)
    finally:
        if backend is None:
            os.environ.pop("TORCH_COMPILE_BACKEND", None)
        else:
            os.environ["TORCH_COMPILE_BACKEND"] = backend
        torch._dynamo.reset()


def _trace_step(cfg, setting: Setting, seq_len: int, trained_fraction: float) -> Estimate:
    """Build, set up and run one step while counting; the peak's bytes by part."""
    live, fake = LiveBytes(), FakeTensorMode(allow_non_fake_inputs=True)
    model = fake_model(cfg.model, training.get_dtype(cfg.dtype, device=torch.device("cpu")), fake)
    with fake:
        linears = [m for m in model.layers.modules() if isinstance(m, nn.Linear) or hasattr(m, "lora_a")]
        frozen = [m.weight for m in linears if not m.weight.requires_grad]  # not LoRA's own lora_a / lora_b
        nf4 = {id(w) for w in frozen} if is_qlora(cfg.model) else set()
        for p in model.parameters():
            size = round(p.numel() * NF4_BYTES_PER_VALUE) if id(p) in nf4 else None
            live.count(p, "adapters + optimizer state" if p.requires_grad else "base weights", size)
        for b in model.buffers():
            live.count(b, "base weights")
        loss_fn = config.instantiate(cfg.loss)
        if setting.compile:
            loss_fn = training.compile_loss(loss_fn, verbose=False)
        objective = objectives.build(cfg.objective, loss_fn)
        rows = setting.batch_size * (2 if objective.pairs else 1)  # a pair is two sequences
        prepare(model, setting.compile, setting.checkpointed_layers, verbose=False)
        trunk, head = Trunk(model), model.output

        def counted_trunk(**inputs):
            with live.counting_as("activations"):
                hidden = trunk(**inputs)
            if hidden.requires_grad:  # not DPO's reference forward
                hidden.register_hook(lambda grad: setattr(live, "part", "activations"))
            return hidden

        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:  # a gradient, once accumulated, belongs with the adapters
            p.register_post_accumulate_grad_hook(lambda p: live.move(p.grad, "adapters + optimizer state"))
        optimizer = config.instantiate(cfg.optimizer, params)
        if getattr(optimizer, "defaults", {}).get("fused"):
            optimizer.defaults["fused"] = False  # fused AdamW has no CPU fake kernel; same state either way
            for group in optimizer.param_groups:
                group["fused"] = False
        offload = ReplayOffloading(live) if setting.offload else contextlib.nullcontext()
        trained = round(rows * seq_len * trained_fraction)
        live.nonzero, live.positions = trained, rows * seq_len
        with live:
            with live.counting_as("adapters + optimizer state"):  # the state a step after the first has
                for p in params:
                    p.grad = torch.zeros_like(p)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batch = fake_batch(rows, seq_len, trained, loss_fn.ignore_index, objective.pairs)
            parts = objectives.ModelParts(model, counted_trunk, head, offload)
            with live.counting_as("output layer + loss"):  # until backward reaches the trunk
                loss, _ = objective(parts, batch, objective.counts(batch))  # DPO: its reference forward too
                loss.backward()
            del loss, batch
            with live.counting_as("adapters + optimizer state"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    parts = {part: live.peak_parts.get(part, 0) for part in PARTS}
    return Estimate(setting, parts, sum(p.nbytes for p in params))


@dataclass
class Plan:
    """Every setting traced, and the choice for a budget."""

    budget: int | None
    num_layers: int
    given: Estimate
    candidates: list[Estimate] = field(default_factory=list)
    choice: Estimate | None = None

    def fits(self, estimate: Estimate) -> bool:
        return self.budget is not None and estimate.total <= self.budget


# How much slower recomputing every layer's activations made a step: 31.2k -> 22.1k tokens/s on the H200
# (bench/results, 3B, packed 4 x 2048, compile); offloading measured no slower there. Checkpointing k of N
# layers is taken to cost k/N of that.
RECOMPUTE_COST = 31_206 / 22_134 - 1


def relative_step_time(setting: Setting, num_layers: int) -> float | None:
    """A step's time relative to no checkpointing, for ranking candidates (lower is faster); None: not known."""
    if setting.compile_memory_budget is not None and setting.compile_memory_budget < 1:
        return None
    return 1 + RECOMPUTE_COST * setting.checkpointed_layers / num_layers


def make_plan(
    cfg, budget: int | None, seq_len: int, trained_fraction: float = 1.0, compile_budgets: bool = False
) -> Plan:
    """Trace the config as given and, with a budget, find the fastest setting that fits.

    Preferred in this order (fastest first at each micro-batch, by RECOMPUTE_COST): no checkpointing; the fewest
    checkpointed layers that fit (interpolated between none and all, then traced); all layers plus offloading;
    then the same at half the micro-batch with twice the gradient accumulation (the same update, see the
    recipe), down to a batch of 1.

    ``compile_budgets`` also traces compile's own activation memory budget where checkpointing was needed: the
    largest budget (in steps of 0.05) that fits. It is shown, not chosen: its speed is not measured yet.
    """
    traced: dict[Setting, Estimate] = {}

    def trace(setting: Setting) -> Estimate:
        if setting not in traced:
            traced[setting] = estimate(cfg, setting, seq_len, trained_fraction)
        return traced[setting]

    n = count_layers(cfg.model)
    layers = (cfg.activation_checkpointing_layers or n) if cfg.enable_activation_checkpointing else 0
    compile_budget = cfg.compile_memory_budget if cfg.compile else None
    given = Setting(
        cfg.batch_size,
        cfg.gradient_accumulation_steps,
        min(layers, n),
        cfg.enable_activation_offloading,
        cfg.compile,
        compile_budget,
    )
    plan = Plan(budget, n, trace(given))
    if budget is None:
        return plan
    batch, accumulation = cfg.batch_size, cfg.gradient_accumulation_steps
    offload = cfg.device.startswith("cuda")  # torchtune offloads to CPU memory from a CUDA device only
    while True:

        def at(layers: int, offloading: bool, batch=batch, accumulation=accumulation) -> Setting:
            return Setting(batch, accumulation, layers, offloading, cfg.compile, compile_budget)

        least = trace(at(n, offload))  # the least memory at this batch
        if plan.fits(least):
            plan.choice = fastest_fitting(plan, trace, at) or least
            break
        if batch == 1 or cfg.resume_from_checkpoint:  # a resumed run must keep its batch geometry
            break
        if least.parts["base weights"] + least.parts["adapters + optimizer state"] > budget:
            batch, accumulation = 1, accumulation * batch  # weights alone are over: only the smallest is worth naming
            continue
        # The same samples per optimizer step: halve an even micro-batch, else go to 1.
        batch, accumulation = (batch // 2, accumulation * 2) if batch % 2 == 0 else (1, accumulation * batch)
    chosen = plan.choice.setting if plan.choice else None
    shown = compile_budgets and cfg.compile and compile_budget is None  # a config with its own budget keeps it
    if shown and chosen and chosen.checkpointed_layers and not chosen.offload:
        b, a = chosen.batch_size, chosen.gradient_accumulation_steps
        none_ = traced[Setting(b, a, 0, False, True, compile_budget)]
        every = traced[Setting(b, a, n, False, True, compile_budget)]
        share = math.floor(20 * (budget - every.total) / max(none_.total - every.total, 1)) / 20
        for _ in range(2):  # activations shrink about linearly with the budget; one step down if not
            if share <= 0 or plan.fits(trace(Setting(b, a, 0, False, True, round(share, 2)))):
                break
            share -= 0.05
    unknown = math.inf  # a candidate of unmeasured speed goes last at its batch
    speed = lambda e: (-e.setting.batch_size, relative_step_time(e.setting, n) or unknown, e.setting.offload)  # noqa: E731
    plan.candidates = sorted(traced.values(), key=speed)
    return plan


def fastest_fitting(plan: Plan, trace, at: Callable[[int, bool], Setting]) -> Estimate | None:
    """No checkpointing if it fits; else the fewest checkpointed layers that fit (interpolated between none and
    all, since each checkpointed layer frees about the same memory, then traced up or down); else None.
    ``at(layers, offload)`` is the setting with that many checkpointed layers at the batch being tried."""
    n = plan.num_layers
    none_ = trace(at(0, False))
    if plan.fits(none_):
        return none_
    every = trace(at(n, False))
    if not plan.fits(every):
        return None
    freed_per_layer = max((none_.total - every.total) / n, 1)
    k = min(n, max(1, math.ceil((none_.total - plan.budget) / freed_per_layer)))

    def fits(layers: int) -> bool:
        return plan.fits(trace(at(layers, False)))

    while not fits(k):
        k += 1  # ends at n at the latest, which fits
    while k > 1 and fits(k - 1):
        k -= 1  # none (k = 0) does not fit
    return trace(at(k, False))


def count_layers(model_cfg) -> int:
    """The number of transformer layers the config builds."""
    return len(meta_model(model_cfg, torch.float32).layers)
