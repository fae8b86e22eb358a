"""Every key the recipes read, declared once, and ``parse``: a config in, a checked ``RecipeSettings`` out.

A typo in a YAML key is silently ignored by ``cfg.get(key, default)``: the run trains for hours with the
default. ``parse`` refuses unknown keys at every depth (with the closest valid name), wrong types and
impossible values, before any weights are read, each as one line naming the key, the config file and the fix.

Component sections (those with ``_component_``) stay DictConfigs so the recipe can ``config.instantiate``
them; their keys are checked against the signature of the class or function they name.
"""

import dataclasses
import difflib
import importlib
import inspect
import pkgutil
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lora_tools.errors import UserError

_REQUIRED = object()


class Origin(str):
    """Where a config came from: its file (the string itself) and the command-line overrides, so an error names
    the override that set a bad key rather than the file."""

    def __new__(cls, file: str, overrides: list[str] | tuple[str, ...] = ()):
        origin = super().__new__(cls, file)
        origin.overrides = tuple(overrides)
        return origin

    def of(self, key: str) -> str:
        """The last override that set ``key`` or a section above it, else the file."""
        for arg in reversed(self.overrides):
            name = arg.split("=", 1)[0].lstrip("~+")
            if key == name or key.startswith((name + ".", name + "[")):
                return f"override {arg}"
        return str(self)


def _of(source: str, key: str) -> str:
    return source.of(key) if isinstance(source, Origin) else source


def setting(doc: str, default: Any = _REQUIRED, **rules: Any) -> Any:
    """A field of RecipeSettings: its one-line doc, its default (none: the key is required) and its rules."""
    metadata = {"doc": doc, "required": default is _REQUIRED, **rules}
    if default is _REQUIRED:
        return field(metadata=metadata)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# Rules for plain values: (test, words for the message). The type itself comes from the annotation.
POSITIVE = (lambda v: v > 0, "greater than 0")
SEED_RANGE = (lambda v: 0 <= v < 2**32, "from 0 to 4294967295")  # torchtune's range
DTYPES = (lambda v: v in ("bf16", "fp32"), "bf16 or fp32")
BUDGET = (lambda v: v == "auto" or parse_size(v) is not None, "auto or a size like 24GiB, 16GB or 8000MiB")
SHARE = (lambda v: 0 <= v <= 1, "from 0 to 1")
MERGE_BASES = (lambda v: v in ("dequantized", "original"), "dequantized or original")

SIZE_UNITS = {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6}


def parse_size(text: str) -> int | None:
    """Bytes of a size like 24GiB, 16GB, 8000MiB or 1.5GiB (case and a space do not matter); None if not one."""
    t = str(text).strip().lower().replace(" ", "")
    for unit, scale in SIZE_UNITS.items():
        if t.endswith(unit):
            try:
                value = float(t[: -len(unit)])
            except ValueError:
                return None
            return int(value * scale) if 0 < value < float("inf") else None
    return None


def as_list(value: Any) -> list:
    """A key that takes one item or a list of them (datasets, checkpoint files), as a list."""
    return list(value) if isinstance(value, ListConfig | list | tuple) else [value]


Component = DictConfig  # a section with _component_: the dotted path of a class or function, and its arguments


@dataclass(frozen=True)
class RecipeSettings:
    """The recipe's settings. Keys without a default are required in every config."""

    # --- required -------------------------------------------------------------------------------------------
    output_dir: str = setting("where checkpoints and logs go, relative to where you run")
    model: Component = setting("model builder with its LoRA settings (lora_rank, lora_alpha, ...)")
    tokenizer: Component = setting("tokenizer builder; max_seq_len truncates samples and sets the pack size")
    checkpointer: Component = setting("reads the base model's weights (checkpoint_dir, checkpoint_files)")
    dataset: Component | ListConfig = setting("training data builder, or a list of them", passes=(1, ()))
    optimizer: Component = setting("optimizer over the LoRA parameters (the recipe passes them)", passes=(1, ()))
    loss: Component = setting("loss function, e.g. torchtune.modules.loss.CEWithChunkedOutputLoss")
    metric_logger: Component = setting("where metrics go: DiskLogger, WandBLogger, ...")
    batch_size: int = setting("samples per micro-batch on each device", rule=POSITIVE)
    epochs: int = setting("passes over the dataset", rule=POSITIVE)
    device: str = setting("cuda, cuda:N or cpu")
    dtype: str = setting("bf16 (GPU) or fp32 (CPU); fp16 is not supported", rule=DTYPES)

    # --- optional -------------------------------------------------------------------------------------------
    objective: Component | None = setting(
        "what training minimizes: lora_tools.train.objectives.DPO or ORPO on pairs; null: SFT with loss",
        None,
        choices="lora_tools.train.objectives.DPO or lora_tools.train.objectives.ORPO (or objective=null for SFT)",
    )
    val_dataset: Component | ListConfig | None = setting(
        "held-out data scored before, during and after training; null: none", None, passes=(1, ())
    )
    lr_scheduler: Component | None = setting(
        "learning-rate schedule (the recipe passes optimizer, num_training_steps); null: constant lr",
        None,
        passes=(1, ("num_training_steps",)),
    )
    profiler: Component | None = setting(
        "PyTorch profiler settings (enabled: True writes a trace under output_dir); null: off",
        None,
        default_component="torchtune.training.setup_torch_profiler",
    )
    max_steps_per_epoch: int | None = setting("stop each epoch after this many optimizer steps", None, rule=POSITIVE)
    gradient_accumulation_steps: int = setting("micro-batches per optimizer step", 1, rule=POSITIVE)
    clip_grad_norm: float | None = setting("clip the adapter's gradient norm; null: no clipping", None, rule=POSITIVE)
    compile: bool = setting("torch.compile the model and loss (the first step is slow)", False)
    enable_activation_checkpointing: bool = setting("recompute activations in backward to save memory", False)
    enable_activation_offloading: bool = setting("move activations to CPU memory in forward (CUDA only)", False)
    compile_memory_budget: float | None = setting(
        "with compile: keep at most this share (0-1) of the saved activations, recompute the rest; null: 1",
        None,
        rule=SHARE,
    )
    activation_checkpointing_layers: int | None = setting(
        "with enable_activation_checkpointing: checkpoint this many layers, spread evenly; null: all",
        None,
        rule=POSITIVE,
    )
    memory_budget: str | None = setting(
        "auto (free GPU memory) or a size like 24GiB: use the fastest settings that fit; null: as written",
        None,
        rule=BUDGET,
    )
    seed: int | None = setting("seed for the adapter's init and the data order; null: random", None, rule=SEED_RANGE)
    shuffle: bool = setting("shuffle the training data each epoch", True)
    resume_from_checkpoint: bool = setting("continue from the newest checkpoint in output_dir", False)
    start_adapter: str | None = setting(
        "train on from another run's adapter (its output_dir or a checkpoints/step_N); null: a fresh one", None
    )
    allow_schedule_change: bool = setting(
        "resume even when epochs/max_steps_per_epoch change the LR schedule's length", False
    )
    save_every_n_steps: int | None = setting("write a checkpoint every N steps and at the end", None, rule=POSITIVE)
    keep_last_n: int | None = setting("keep only the newest N step checkpoints; null: keep all", None, rule=POSITIVE)
    save_adapter_weights_only: bool = setting("write the adapter only, not the merged model", False)
    qlora_merge_base: str = setting(
        "QLoRA: merge into the NF4 base as trained (dequantized) or the original weights",
        "dequantized",
        rule=MERGE_BASES,
    )
    run_val_every_n_steps: int | None = setting("score val_dataset every N steps", None, rule=POSITIVE)
    early_stopping_patience: int | None = setting("stop after N evals without a new best loss", None, rule=POSITIVE)
    sample_prompts: list[str] = setting("prompts answered (greedy) during and after training; null: none", [])
    sample_every_n_steps: int | None = setting("answer sample_prompts every N steps", None, rule=POSITIVE)
    eval_tasks: list[str] = setting(
        "lm-evaluation-harness tasks scored on the base and the finetuned model after training (eval.json)", []
    )
    eval_limit: int | None = setting("at most this many samples per eval task; null: all", None, rule=POSITIVE)
    log_every_n_steps: int = setting("log metrics every N steps", 1, rule=POSITIVE)
    log_peak_memory_stats: bool = setting("log peak memory (GPU, or the process's RSS on CPU)", False)
    collate_fn: str = setting(
        "batch collate function (dotted path)", "torchtune.data.padded_collate_sft", importable=True
    )
    fsdp_cpu_offload: bool = setting("distributed recipe: keep the weight shards in CPU memory", False)
    fsdp_reshard_after_forward: bool = setting("distributed recipe: free gathered weights after forward", True)


# Values of component arguments that have the right type but make no sense: (section, key, test, words).
# "dataset" also covers val_dataset and each entry of a list of datasets.
VALUE_RULES = (
    ("model", "lora_rank", lambda v: _is_int(v) and v > 0, "an integer greater than 0, e.g. 16"),
    ("model", "lora_alpha", lambda v: _is_number(v) and v > 0, "a number greater than 0, usually 2 x lora_rank"),
    ("model", "lora_dropout", lambda v: _is_number(v) and 0 <= v < 1, "a number from 0 up to (not including) 1"),
    ("optimizer", "lr", lambda v: _is_number(v) and v >= 0, "a number >= 0, e.g. 3e-4"),
    ("tokenizer", "max_seq_len", lambda v: v is None or (_is_int(v) and v > 0), "an integer greater than 0"),
    ("lr_scheduler", "num_warmup_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("objective", "beta", lambda v: _is_number(v) and v > 0, "a number greater than 0, e.g. 0.1"),
    ("objective", "label_smoothing", lambda v: _is_number(v) and 0 <= v < 0.5, "a number from 0 up to 0.5, e.g. 0"),
    ("objective", "sft_weight", lambda v: _is_number(v) and v >= 0, "a number >= 0, e.g. 1.0"),
    ("dataset", "conversation_style", lambda v: v in ("sharegpt", "openai"), "sharegpt or openai"),
)

# Keys of every dataset section (of dataset and val_dataset, and of each entry of a list of them) that
# lora_tools.data.batching reads itself and never passes to the builder (lora_tools.data.mixing): doc, test, words.
DATASET_SECTIONS = ("dataset", "val_dataset")
DATASET_KEYS = {
    "weight": (
        "in a list of datasets, this one's share of each epoch (normalized over the list); null: none",
        lambda v: v is None or (_is_number(v) and 0 < v < float("inf")),
        "a number greater than 0, e.g. 0.8 (or null)",
    ),
    "max_samples": (
        "use at most this many samples of this dataset, a random subset drawn from the seed; null: all",
        lambda v: v is None or (_is_int(v) and v >= 1),
        "an integer >= 1 (or null)",
    ),
}


def check_dataset_keys(sections: list, name: str, source: str = "") -> None:
    """DATASET_KEYS of a dataset section, or of each section of a list of them (``name``: dataset or
    val_dataset): each value's rule, and a weight on every section of a list or on none."""
    for i, section in enumerate(sections):
        where = f"{name}[{i}]" if len(sections) > 1 else name
        for key, (_doc, test, words) in DATASET_KEYS.items():
            if key in section and not test(section[key]):
                prefix = f"{_of(source, f'{where}.{key}')}: " if source else ""
                raise UserError(
                    f"{prefix}{where}.{key} is {_show(section[key])}, but it must be {words}; "
                    f"fix {where}.{key} in the config"
                )
    prefix = f"{_of(source, name)}: " if source else ""
    weighted = [section.get("weight", None) is not None for section in sections]
    if any(weighted) and not all(weighted):
        without, given = weighted.index(False), weighted.index(True)
        raise UserError(
            f"{prefix}{name}[{without}] has no weight but {name}[{given}] has one; give every section a weight, or none"
        )


# Common names for arguments that difflib cannot match (too different in spelling).
ALIASES = {"learning_rate": "lr", "rank": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout"}


def parse(cfg: DictConfig, source: str) -> RecipeSettings:
    """Check ``cfg`` (the merged config of the file ``source`` and its overrides) and return its settings.

    Raises UserError with one line at the first mistake. Reads no weights and writes nothing.
    """
    plain = _resolve(cfg, source)
    fields = {f.name: f for f in dataclasses.fields(RecipeSettings)}
    for key in plain:
        if key not in fields:
            raise _unknown(source, str(key), str(key), list(fields))
    for name, f in fields.items():
        if f.metadata["required"] and plain.get(name) is None:
            raise UserError(
                f"{source}: required key '{name}' is missing; add it to the config "
                f"(see lora_finetune_single_device.yaml) or pass {name}=... on the command line"
            )
    values = {}
    for name, f in fields.items():
        if name not in plain:
            continue
        if _is_component_field(f):
            values[name] = _component_section(source, name, plain[name], f)
        else:
            values[name] = _plain_value(source, name, plain[name], f)
    return RecipeSettings(**values)


def docs() -> dict[str, str]:
    """Each key with its doc, in declaration order (for help texts and the tests)."""
    return {f.name: f.metadata["doc"] for f in dataclasses.fields(RecipeSettings)}


# ---- plain values ---------------------------------------------------------------------------------------------


def _plain_value(source: str, key: str, value: Any, f: dataclasses.Field) -> Any:
    if key in ("sample_prompts", "eval_tasks") and value is None:
        return []
    if key == "dtype" and value == "fp16":
        raise UserError(f"{source}: dtype fp16 is not supported: use dtype=bf16 (GPU) or dtype=fp32 (CPU)")
    rule = f.metadata.get("rule")
    fits = _fits(value, f.type)
    if fits is False or (rule and value is not None and not rule[0](value)):
        expected = _describe(_without_none(f.type))
        if rule:
            expected = rule[1] if rule in (DTYPES, BUDGET) else f"{expected} {rule[1]}"
        if _allows_none(f.type):
            expected += " (or null)"
        raise _bad_value(source, key, value, expected)
    if key == "device":
        _check_device(source, value)
    if f.metadata.get("importable"):
        _import(source, key, value)
    return list(value) if isinstance(value, list) else value


def _check_device(source: str, device: str) -> None:
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"{source}: device '{device}' is not a device PyTorch knows; use cuda, cuda:N or cpu")


# ---- component sections -------------------------------------------------------------------------------------


def _is_component_field(f: dataclasses.Field) -> bool:
    return f.type is DictConfig or DictConfig in typing.get_args(f.type)


def _component_section(source: str, name: str, value: Any, f: dataclasses.Field) -> DictConfig | ListConfig | None:
    optional = not f.metadata["required"]
    default_component = f.metadata.get("default_component")
    if isinstance(value, dict) and optional and value.get("_component_", default_component) is None:
        others = sorted(k for k in value if k != "_component_")
        if others:  # a section with arguments but no _component_ (a typo in the key) must not switch it off
            raise UserError(
                f"{source}: {name} has {others[0]!r} but no _component_; add {name}._component_ (the dotted path "
                f"of a class or function), or set {name}=null to turn it off"
            )
        value = None  # `key=null` with torchtune's parser leaves the section with a null _component_
    if value is None:
        return None
    if isinstance(value, list) and ListConfig in typing.get_args(f.type):
        if not value:
            raise UserError(f"{source}: {name} is an empty list; give at least one dataset section or null")
        for i, item in enumerate(value):
            _check_component(source, f"{name}[{i}]", item, f.metadata.get("passes", (0, ())))
        if name in DATASET_SECTIONS:
            check_dataset_keys(value, name, source)
        return OmegaConf.create(value)
    if isinstance(value, dict) and "_component_" not in value and default_component:
        value = {"_component_": default_component, **value}
    _check_component(source, name, value, f.metadata.get("passes", (0, ())), f.metadata.get("choices"))
    if name in DATASET_SECTIONS:
        check_dataset_keys([value], name, source)
    return OmegaConf.create(value)


def _check_component(
    source: str, section: str, node: Any, passes: tuple[int, tuple[str, ...]], choices: str | None = None
) -> None:
    """Keys of a component section against the signature of what it names; ``passes``: (leading positional
    arguments, keyword arguments) that the recipe itself gives when it instantiates the section; ``choices``:
    the components the section takes, named when _component_ is nothing like any of them."""
    if not isinstance(node, dict) or not isinstance(node.get("_component_"), str):
        raise UserError(
            f"{source}: {section} must be a section with _component_ (the dotted path of a class or function) "
            f"and its arguments; see lora_finetune_single_device.yaml"
        )
    path = node["_component_"]
    try:
        target = _import(source, f"{section}._component_", path)
    except UserError as e:
        if not (choices and str(e).endswith("; check the name")):
            raise
        raise UserError(str(e).removesuffix("check the name") + f"use {choices}") from None
    if not callable(target):
        raise UserError(f"{source}: {section}._component_ {path} is not a class or function; check the name")
    try:
        try:
            signature = inspect.signature(target, eval_str=True)
        except Exception:  # an annotation that does not evaluate: check names only
            signature = inspect.signature(target)
    except (TypeError, ValueError):
        return  # a builtin without a signature: nothing to check against
    n_positional, passed_keywords = passes
    params = list(signature.parameters.values())
    by_position = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:n_positional]
    passed = {p.name for p in by_position} | set(passed_keywords)
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    extra = _extra_keyword_names(target, node) if any(p.kind == p.VAR_KEYWORD for p in params) else {}
    short = section.split("[")[0]
    own = set(DATASET_KEYS) if short in DATASET_SECTIONS else set()  # read by the recipe, checked by the caller
    for key, value in node.items():
        if key == "_component_" or key in own:
            continue
        if key in passed:
            raise UserError(
                f"{source}: {section}.{key} is given by the recipe itself; remove {section}.{key} from the config"
            )
        if key in named:
            annotation = named[key].annotation
        elif extra is None:
            continue  # **kwargs that take anything (e.g. metric loggers)
        elif key in extra:
            annotation = extra[key]
        else:
            known = {"_component_", *named, *passed, *extra, *own}
            unknown = [k for k in node if k not in known]
            raise _unknown(source, f"{section}.{key}", key, [*(set(named) - passed), *extra, *own], path, unknown)
        if _fits(value, annotation) is False:
            raise _bad_value(source, f"{section}.{key}", value, _describe(annotation), f"{path} takes ")
        for rule_section, rule_key, test, words in VALUE_RULES:
            if rule_section == short.removeprefix("val_") and rule_key == key and not test(value):
                raise _bad_value(source, f"{section}.{key}", value, words)
    for name, p in named.items():
        if p.default is p.empty and name not in passed and name not in node:
            raise UserError(
                f"{source}: {section} is missing '{name}', a required argument of {path}; "
                f"add {section}.{name} to the config or pass {section}.{name}=... on the command line"
            )


def _extra_keyword_names(target: Any, node: dict) -> dict[str, Any] | None:
    """Names a **kwargs target accepts beyond its own parameters, with their annotations; None: any name.

    torchtune's dataset builders pass **kwargs to ``datasets.load_dataset``: its own parameters, and for the
    packaged local-file loaders (json, csv, ...) the fields of that loader's config dataclass."""
    module = getattr(getattr(target, "func", target), "__module__", "") or ""
    if module.startswith("torchtune.training.metric_logging"):
        # Any key one of torchtune's loggers (or wandb.init, behind WandBLogger) understands, so that a config can
        # switch loggers on the command line and keep the other's keys; anything else is a typo that would do
        # nothing (DiskLogger ignores extra keywords) or fail late (wandb.init).
        import wandb
        from torchtune.training import metric_logging

        loggers = [
            obj for obj in vars(metric_logging).values() if isinstance(obj, type) and obj.__name__.endswith("Logger")
        ]
        names = {n for cls in loggers for n in inspect.signature(cls).parameters}
        names |= set(inspect.signature(wandb.init).parameters)
        return {n: inspect.Parameter.empty for n in names if n not in ("args", "kwargs")}
    if not module.startswith("torchtune.datasets"):
        return None
    import datasets

    load_params = inspect.signature(datasets.load_dataset).parameters
    names = {n: p.annotation for n, p in load_params.items() if p.kind == p.POSITIONAL_OR_KEYWORD and n != "path"}
    source = node.get("source")
    if source in ("json", "csv", "parquet", "text", "arrow"):
        loader = importlib.import_module(f"datasets.packaged_modules.{source}.{source}")
        for obj in vars(loader).values():
            if isinstance(obj, type) and issubclass(obj, datasets.BuilderConfig) and obj.__module__ == loader.__name__:
                names.update({f.name: inspect.Parameter.empty for f in dataclasses.fields(obj)})
    return names


# ---- imports by dotted path ---------------------------------------------------------------------------------


def _import(source: str, key: str, path: str) -> Any:
    """The object a dotted path names (importlib, then getattr), or UserError with the closest existing name."""
    source = _of(source, key)
    parts = path.split(".")
    if not all(p.isidentifier() for p in parts):
        raise UserError(f"{source}: {key} {path!r} is not a dotted Python path; write e.g. torch.optim.AdamW")
    obj, found = None, 0
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            obj, found = importlib.import_module(name), i
            break
        except ModuleNotFoundError as e:
            # Not a module (or a parent is not): try a shorter prefix. Another missing module is a real failure.
            if e.name and not (name == e.name or name.startswith(e.name + ".")):
                raise UserError(f"{source}: {key} {path}: importing {name} failed ({e}); install the missing package")
        except Exception as e:  # the module exists but raises on import
            raise UserError(f"{source}: {key} {path}: importing {name} failed ({type(e).__name__}: {e})")
    if obj is None:
        names = [m.name for m in pkgutil.iter_modules() if not m.name.startswith("_")]
        raise UserError(f"{source}: {key} {path} does not exist: no module {parts[0]}{_did_you_mean(parts, 0, names)}")
    for i in range(found, len(parts)):
        if not hasattr(obj, parts[i]):
            where = ".".join(parts[:i])
            raise UserError(
                f"{source}: {key} {path} does not exist: {where} has no {parts[i]}"
                f"{_did_you_mean(parts, i, _public_names(obj))}"
            )
        obj = getattr(obj, parts[i])
    return obj


def _public_names(obj: Any) -> list[str]:
    names = [n for n in dir(obj) if not n.startswith("_")]
    if hasattr(obj, "__path__"):  # a package: its submodules too, imported or not
        names += [m.name for m in pkgutil.iter_modules(obj.__path__) if not m.name.startswith("_")]
    return names


def _did_you_mean(parts: list[str], i: int, names: list[str]) -> str:
    match = difflib.get_close_matches(parts[i], names, n=1)
    if not match:
        return "; check the name"
    return f"; did you mean {'.'.join([*parts[:i], match[0], *parts[i + 1 :]])}?"


# ---- types, messages ----------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _members(annotation: Any) -> tuple | None:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return None


def _is_tensor(annotation: Any) -> bool:
    """A tensor cannot be written in YAML, so a ``float | Tensor`` argument takes a number from a config."""
    return isinstance(annotation, type) and annotation.__name__ == "Tensor" and annotation.__module__ == "torch"


def _fits(value: Any, annotation: Any) -> bool | None:
    """Whether a YAML value fits a simple annotation; None when the annotation says nothing we can check."""
    if annotation is type(None) or annotation is None:
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return _is_int(value)
    if annotation is float:
        return _is_number(value)
    if annotation is str:
        return isinstance(value, str)
    if annotation is DictConfig:
        return isinstance(value, dict)
    if annotation is ListConfig:
        return isinstance(value, list)
    members = _members(annotation)
    if members is not None:
        answers = [_fits(value, m) for m in members if not _is_tensor(m)]
        return True if True in answers else (None if None in answers else False)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is list or origin is list:
        if not isinstance(value, list):
            return False
        item = (typing.get_args(annotation) or (Any,))[0]
        answers = [_fits(v, item) for v in value]
        return False if False in answers else (None if None in answers else True)
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    return None


_WORDS = {bool: "True or False", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def _describe(annotation: Any) -> str:
    if annotation in _WORDS:
        return _WORDS[annotation]
    members = _members(annotation)
    if members is not None:
        return " or ".join(dict.fromkeys(_describe(m) for m in members if not _is_tensor(m)))
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"a list, each item {_describe(typing.get_args(annotation)[0])}"
    if annotation is DictConfig:
        return "a section with _component_"
    if annotation is ListConfig:
        return "a list of sections"
    return getattr(annotation, "__name__", str(annotation))


def _allows_none(annotation: Any) -> bool:
    return type(None) in (_members(annotation) or ())


def _without_none(annotation: Any) -> Any:
    members = [m for m in (_members(annotation) or ()) if m is not type(None)]
    return members[0] if len(members) == 1 else annotation


def _show(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad_value(source: str, key: str, value: Any, expected: str, who: str = "") -> UserError:
    return UserError(
        f"{_of(source, key)}: {key} is {_show(value)}, but {who or 'it must be '}{expected}; "
        f"fix {key} in the config or pass {key}=... on the command line"
    )


def _unknown(
    source: str, key: str, name: str, candidates: list[str], component: str = "", others: list[str] | None = None
) -> UserError:
    """One line for a key nothing reads, with the closest valid one. A component's key with no close match (such
    as DPO's keys left in when the section switches to ORPO): every such key of the section (``others``), and
    what the component takes instead."""
    prefix = key[: len(key) - len(name)]
    alias = ALIASES.get(name)
    match = [alias] if alias in candidates else difflib.get_close_matches(name, candidates, n=1)
    if component and not match:
        keys = [f"'{prefix}{k}'" for k in others or [name]]
        listed = keys[0] if len(keys) == 1 else f"{', '.join(keys[:-1])} and {keys[-1]}"
        takes = f" (it takes {', '.join(sorted(candidates)) or 'no arguments'})" if len(candidates) <= 8 else ""
        many = len(keys) > 1
        return UserError(
            f"{_of(source, key)}: unknown key{'s' * many} {listed}: {component} takes no such argument{'s' * many}"
            f"{takes}; remove {'them' if many else 'it'} or fix the spelling"
        )
    where = f" for {component}" if component else ""
    hint = f"; did you mean '{prefix}{match[0]}'?" if match else ""
    return UserError(f"{_of(source, key)}: unknown key '{key}'{where}{hint} (remove it or fix the spelling)")


def _resolve(cfg: DictConfig, source: str) -> dict:
    """The config as plain Python values with every ${...} interpolation resolved."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        reason = (getattr(e, "msg", None) or str(e)).strip().splitlines()[0]
        raise UserError(f"{source}: {key} cannot be resolved ({reason}); fix the ${{...}} reference or set the key")
    if not isinstance(plain, dict):
        raise UserError(f"{source}: the config must be a mapping of key: value")
    return plain
