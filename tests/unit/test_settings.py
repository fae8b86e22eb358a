"""lora_tools.config.settings and the config parser in lora_tools.config.loader, in-process: every shipped config
parses, and each kind of mistake is one line that names the key, the file and the fix."""

import ast
import dataclasses
import re

import pytest
from conftest import REPO, TINY_CONFIG
from omegaconf import DictConfig, ListConfig, OmegaConf

from lora_tools.config import settings
from lora_tools.config.loader import load_config, read_yaml
from lora_tools.errors import UserError

SHIPPED_CONFIGS = [REPO / "lora_finetune_single_device.yaml", *sorted((REPO / "configs").glob("*.yaml"))]
TINY = "configs/tiny.yaml"


def parse(*overrides: str, config: str = TINY) -> settings.RecipeSettings:
    return settings.parse(load_config(["--config", config, *overrides]), config)


def error(*overrides: str, config: str = TINY) -> str:
    with pytest.raises(UserError) as e:
        parse(*overrides, config=config)
    message = str(e.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses(config):
    rel = str(config.relative_to(REPO))
    s = settings.parse(load_config(["--config", rel]), rel)
    assert isinstance(s, settings.RecipeSettings)
    assert isinstance(s.model, DictConfig) and s.model._component_.startswith("torchtune.models.")
    assert isinstance(s.dataset, DictConfig | ListConfig)
    assert s.batch_size > 0 and s.epochs > 0 and s.dtype in ("bf16", "fp32")
    assert s.checkpointer.output_dir == s.output_dir  # ${output_dir} resolved
    assert all(isinstance(p, str) for p in s.sample_prompts)
    assert s.allow_schedule_change is False


def test_defaults_and_nulls():
    s = parse("~sample_prompts", "~lr_scheduler", "val_dataset=null", "~profiler", "~gradient_accumulation_steps")
    assert s.sample_prompts == [] and s.lr_scheduler is None and s.val_dataset is None and s.profiler is None
    assert s.gradient_accumulation_steps == 1 and s.collate_fn == "torchtune.data.padded_collate_sft"
    assert parse("sample_prompts=null").sample_prompts == []
    # A profiler section without _component_ is torchtune's profiler, as the recipe has always read it.
    assert parse("profiler={enabled: False}").profiler._component_ == "torchtune.training.setup_torch_profiler"


def test_every_field_has_a_one_line_doc():
    for f in dataclasses.fields(settings.RecipeSettings):
        doc = f.metadata.get("doc", "")
        assert doc and "\n" not in doc and len(doc) < 100, f.name
    assert list(settings.docs()) == [f.name for f in dataclasses.fields(settings.RecipeSettings)]


def test_required_keys_are_the_fields_without_default():
    no_default = [f.name for f in dataclasses.fields(settings.RecipeSettings) if f.default is dataclasses.MISSING
                  and f.default_factory is dataclasses.MISSING]  # fmt: skip
    required = [f.name for f in dataclasses.fields(settings.RecipeSettings) if f.metadata["required"]]
    assert required == no_default
    assert {"output_dir", "model", "dataset", "batch_size", "device", "dtype"} <= set(required)


@pytest.mark.parametrize("recipe", ["lora_finetune_single_device.py", "lora_finetune_distributed.py"])
def test_every_key_a_recipe_reads_is_declared_with_its_default(recipe):
    """Keys read as cfg.get("key", default) in a recipe: declared, with the same default."""
    fields = {f.name: f for f in dataclasses.fields(settings.RecipeSettings)}
    source = (REPO / recipe).read_text() if (REPO / recipe).exists() else ""
    for key, default in re.findall(r"\bcfg\.get\(\s*\"(\w+)\"\s*(?:,\s*([^()]*?))?\s*\)", source):
        assert key in fields, f"{recipe} reads {key}, which RecipeSettings does not declare"
        f = fields[key]
        declared = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default and default != "None":
            assert ast.literal_eval(default) == declared, key


# --- each kind of mistake: (overrides, words the one line must hold) -----------------------------------------

MISTAKES = {
    "unknown top-level": (["foo=1"], ["configs/tiny.yaml", "unknown key 'foo'", "remove it or fix the spelling"]),
    "top-level typo": (["early_stoping_patience=2"], ["did you mean 'early_stopping_patience'?"]),
    "batchsize": (["batchsize=4"], ["unknown key 'batchsize'", "did you mean 'batch_size'?"]),
    "model key typo": (["model.lora_rnak=4"], ["'model.lora_rnak'", "lora_llama3_2", "did you mean 'model.lora_rank'"]),
    "optimizer alias": (["optimizer.learning_rate=1e-3"], ["torch.optim.AdamW", "did you mean 'optimizer.lr'"]),
    "dataset key typo": (["dataset.trian_on_input=True"], ["did you mean 'dataset.train_on_input'"]),
    "load_dataset kwarg typo": (["dataset.streamin=True"], ["did you mean 'dataset.streaming'"]),
    "json loader field typo": (["dataset.feild=data"], ["did you mean 'dataset.field'"]),
    "csv loader field": (["dataset.source=csv", "dataset.delimter=;"], ["did you mean 'dataset.delimiter'"]),
    "checkpointer typo": (["checkpointer.checkpoint_fils=[a]"], ["did you mean 'checkpointer.checkpoint_files'"]),
    "batch_size 0": (["batch_size=0"], ["batch_size is 0", "integer greater than 0"]),
    "batch_size -1": (["batch_size=-1"], ["batch_size is -1", "integer greater than 0"]),
    "batch_size string": (["batch_size='4'"], ["batch_size is '4'", "an integer"]),
    "grad accumulation 0": (["gradient_accumulation_steps=0"], ["gradient_accumulation_steps is 0"]),
    "max steps 0": (["max_steps_per_epoch=0"], ["max_steps_per_epoch is 0", "(or null)"]),
    "epochs 0": (["epochs=0"], ["epochs is 0"]),
    "bool is not an int": (["epochs=true"], ["epochs is True", "an integer"]),
    "lora_rank 0": (["model.lora_rank=0"], ["model.lora_rank is 0", "greater than 0"]),
    "lora_rank float": (["model.lora_rank=1.5"], ["model.lora_rank is 1.5", "an integer"]),
    "lora_dropout 1": (["model.lora_dropout=1.0"], ["model.lora_dropout is 1.0"]),
    "lora modules": (["model.lora_attn_modules=[q_proj,x_proj]"], ["'q_proj', 'k_proj'"]),
    "lr abc (signature)": (["optimizer.lr=abc"], ["optimizer.lr is 'abc'", "torch.optim.AdamW takes a number"]),
    "lr negative (rule)": (["optimizer.lr=-1"], ["optimizer.lr is -1", ">= 0"]),
    "fused not a bool": (["optimizer.fused=maybe"], ["optimizer.fused is 'maybe'", "True or False"]),
    "max_seq_len 0": (["tokenizer.max_seq_len=0"], ["tokenizer.max_seq_len is 0"]),
    "dtype fp16": (["dtype=fp16"], ["use dtype=bf16 (GPU) or dtype=fp32 (CPU)"]),
    "dtype other": (["dtype=float32"], ["dtype is 'float32'", "bf16 or fp32"]),
    "device typo": (["device=cuad"], ["device 'cuad'", "cuda, cuda:N or cpu"]),
    "compile maybe": (["compile=maybe"], ["compile is 'maybe'", "True or False"]),
    "compile yes": (["compile=yes"], ["compile is 'yes'", "True or False"]),
    "compile 1.5": (["compile=1.5"], ["compile is 1.5"]),
    "compile null": (["compile=null"], ["compile is null"]),
    "sample_prompts 5": (["sample_prompts=5"], ["sample_prompts is 5", "a list"]),
    "sample_prompts ints": (["sample_prompts=[1,2]"], ["sample_prompts is [1, 2]", "a string"]),
    "seed negative": (["seed=-1"], ["seed is -1"]),
    "model component": (
        ["model._component_=torchtune.models.llama3_2.lora_llama3_2_3bb"],
        ["model._component_", "did you mean torchtune.models.llama3_2.lora_llama3_2_3b?"],
    ),
    "component shorthand": (
        ["optimizer=torch.optim.AdamWW"],
        ["optimizer._component_", "did you mean torch.optim.AdamW?"],
    ),
    "missing module": (
        ["loss._component_=torchtune.modules.losss.CEWithChunkedOutputLoss"],
        [
            "loss._component_",
            "torchtune.modules has no losss",
            "did you mean torchtune.modules.loss.CEWithChunkedOutputLoss?",
        ],
    ),
    "missing package": (["loss._component_=nosuchpackage.Loss"], ["no module nosuchpackage"]),
    "collate_fn": (
        ["collate_fn=torchtune.data.padded_collate_sftt"],
        ["did you mean torchtune.data.padded_collate_sft?"],
    ),
    "not a section": (["~optimizer._component_"], ["_component_"]),
    "required argument": (
        ["~checkpointer.checkpoint_dir"],
        ["checkpointer is missing 'checkpoint_dir'", "FullModelHFCheckpointer"],
    ),
    "recipe passes it": (["lr_scheduler.num_training_steps=5"], ["given by the recipe itself"]),
    "conversation style": (
        [
            "dataset._component_=torchtune.datasets.chat_dataset",
            "dataset.conversation_column=c",
            "dataset.conversation_style=x",
        ],
        ["dataset.conversation_style is 'x'", "sharegpt or openai"],
    ),
    "broken interpolation": (["checkpointer.output_dir=${output_dirr}"], ["checkpointer.output_dir", "output_dirr"]),
    "missing required key": (["~batch_size"], ["required key 'batch_size' is missing", "configs/tiny.yaml"]),
    "not key=value": (["batch_size"], ["key=value"]),
    "bad YAML value": (["sample_prompts=[a"], ["sample_prompts", "not a valid YAML value"]),
    "unknown option": (["--foo"], ["unknown option --foo"]),
    "dataset weight 0": (["dataset.weight=0"], ["configs/tiny.yaml: dataset.weight is 0", "greater than 0"]),
    "dataset weight abc": (["dataset.weight=abc"], ["dataset.weight is 'abc'", "a number greater than 0"]),
    "max_samples float": (["dataset.max_samples=1.5"], ["dataset.max_samples is 1.5", "an integer >= 1"]),
    "dataset weight typo": (["dataset.wieght=1"], ["did you mean 'dataset.weight'"]),
    "remove missing key": (["~model.lora_rankk"], ["no key model.lora_rankk"]),
}


@pytest.mark.parametrize("overrides, words", MISTAKES.values(), ids=MISTAKES.keys())
def test_mistake_is_one_line(overrides, words):
    message = error(*overrides)
    for word in words:
        assert word in message, message


def test_a_typo_inside_the_yaml_file_names_the_file(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text(TINY_CONFIG.read_text().replace("lora_rank: 16", "lora_rnak: 16"))
    message = error(config=str(config))
    assert str(config) in message and "'model.lora_rnak'" in message and "'model.lora_rank'" in message


def test_val_dataset_list_is_checked_per_entry():
    entry = "{_component_: torchtune.datasets.alpaca_dataset, source: json, data_files: x.json, splitt: train}"
    assert "unknown key 'val_dataset[0].splitt'" in error(f"val_dataset=[{entry}]")
    assert "did you mean 'val_dataset[0].split'" in error(f"val_dataset=[{entry}]")


def test_dataset_mixing_keys_are_known_and_documented():
    for key, (doc, _test, _words) in settings.DATASET_KEYS.items():
        assert doc and "\n" not in doc and len(doc) < 100, key
    entry = "{_component_: torchtune.datasets.alpaca_dataset, source: json, data_files: x.json%s}"
    listed = f"dataset=[{entry % ', weight: 3, max_samples: 40'}, {entry % ', weight: 1'}]"
    assert [d.weight for d in parse(listed).dataset] == [3, 1] and parse(listed).dataset[0].max_samples == 40
    assert parse("dataset.weight=2", "val_dataset.max_samples=5").val_dataset.max_samples == 5  # one dataset: fine
    message = error(f"dataset=[{entry % ''}, {entry % ', weight: 1'}]")
    assert message.startswith(TINY) and "dataset[0] has no weight but dataset[1] has one" in message
    assert "dataset[1].max_samples is 0" in error(f"dataset=[{entry % ''}, {entry % ', max_samples: 0'}]")


def test_metric_logger_keys_of_any_logger_pass_and_typos_do_not():
    # A config can switch loggers and keep the other's keys (DiskLogger ignores W&B's project).
    assert parse("metric_logger.project=p").metric_logger.project == "p"
    with pytest.raises(UserError, match="did you mean 'metric_logger.filename'"):
        parse("metric_logger.filenme=a.txt")


# --- the command-line parser ---------------------------------------------------------------------------------


def test_yaml_syntax_error_keeps_line_and_column(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text(
        "output_dir: x\n\nmodel:\n  _component_: a\n  lora_rank: 8\n  lora_alpha: 16\n  lora_dropout 0.0\n"
    )
    with pytest.raises(UserError) as e:
        read_yaml(str(config))
    assert str(e.value) == f"{config} line 7, column 3: could not find expected ':' ; fix the YAML at that place"


def test_duplicate_yaml_key_is_refused(tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text("a: 1\nb:\n  c: 1\n  c: 2\n")
    with pytest.raises(UserError, match=r"line 4, column 3: key 'c' is given twice"):
        read_yaml(str(config))


def test_overrides_follow_torchtune_syntax():
    cfg = load_config(
        ["--config", TINY, "model.lora_rank=4", "seed=None", "~sample_prompts", "loss=x.Loss", "a.b=[1, 2]"]
    )
    assert cfg.model.lora_rank == 4 and cfg.seed is None and "sample_prompts" not in cfg
    assert cfg.loss._component_ == "x.Loss" and list(cfg.a.b) == [1, 2]
    assert cfg.optimizer.lr == 5e-3 and isinstance(cfg.optimizer.lr, float)  # 5e-3 is a float, as in OmegaConf
    assert cfg.checkpointer.output_dir == "outputs/tiny"  # interpolations resolve against the merged config
    assert load_config(["--config", TINY, "val_dataset=null"]).val_dataset is None
    assert load_config(["--config", TINY, "checkpointer.max_filename=0001"]).checkpointer.max_filename == "0001"


def test_same_result_as_torchtunes_parser():
    """For values both read alike (not yes/no/on/off), the merged config equals torchtune's."""
    from torchtune.config._parse import TuneRecipeArgumentParser
    from torchtune.config._utils import _merge_yaml_and_cli_args

    argv = ["--config", TINY, "model.lora_rank=4", "seed=None", "~sample_prompts", "loss=x.Loss", "lr_scheduler.x=1e-3"]
    theirs = _merge_yaml_and_cli_args(*TuneRecipeArgumentParser().parse_known_args(argv))
    assert OmegaConf.to_container(load_config(argv)) == OmegaConf.to_container(theirs)
