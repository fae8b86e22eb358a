"""Reading a config: the YAML file, the key=value overrides after it, and the typed settings, in one pass.

The command line is torchtune's: ``--config FILE key=value ...``, dotted keys for nested values, ``~key``
deletes a key, ``section=path`` sets a component section's ``_component_``, ``None`` is null, and each value
is read as YAML. One difference, on purpose: only true/false (any case) are booleans, so ``compile: yes`` is
refused instead of silently becoming True.

``load`` is what the recipes and commands call: it returns the merged DictConfig (what ``config.instantiate``
and the logs need) and its checked ``RecipeSettings`` together, so nothing parses a config twice.
"""

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lora_tools.config import settings
from lora_tools.errors import UserError

USAGE = "tune run RECIPE.py --config FILE [key=value ...]"


class ConfigLoader(yaml.SafeLoader):
    """YAML as OmegaConf reads it (1e-4 is a float, dates stay strings), except that only true/false are
    booleans (not yes/no/on/off), and a key given twice in one mapping is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"key '{key_node.value}' is given twice",
                        key_node.start_mark,
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_DROPPED_TAGS = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp"}
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _DROPPED_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?[0-9]+(?:_[0-9]+)*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
        |\.[0-9]+(?:_[0-9]+)*(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the usage and a second line
        raise UserError(f"{message}; usage: {USAGE}")


def parse_args(argv: list[str], description: str = "") -> tuple[str, list[str]]:
    """``--config FILE`` and the overrides after it; --help prints the recipe's description."""
    parser = _ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the YAML config file")
    args, overrides = parser.parse_known_args(argv)
    flags = [a for a in overrides if a.startswith("-") and not a.startswith("~")]
    if flags:
        raise UserError(f"unknown option {flags[0]}; pass --config FILE and key=value overrides ({USAGE})")
    return args.config, overrides


def read_yaml(path: str) -> dict:
    """A config file as a plain dict; every way it can be unreadable is one line, YAML errors with their place."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path} (run from the repository root, or pass a valid path)")
    except IsADirectoryError:
        raise UserError(f"--config {path} is a folder; pass a YAML file")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8")
    except OSError as e:
        raise UserError(f"--config {path} cannot be read ({e.strerror})")
    try:
        data = yaml.load(text, Loader=ConfigLoader)
    except yaml.MarkedYAMLError as e:
        # A key without ':' is found only on the next line; PyYAML's context mark is the key itself.
        simple_key = e.context_mark is not None and "simple key" in (e.context or "")
        mark = e.context_mark if simple_key else (e.problem_mark or e.context_mark)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}{where}: {e.problem or e.context} ; fix the YAML at that place")
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).strip().splitlines()[0]}); fix the file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the file must be a mapping of key: value lines, not a {type(data).__name__}")
    if "config" in data:
        raise UserError(f"{path}: 'config' cannot be a key in a config file; remove it")
    return data


def _value(key: str, text: str) -> Any:
    """An override's value, read as YAML (as OmegaConf.from_dotlist does), with torchtune's two exceptions."""
    if text == "None":
        return None
    if "max_filename" in key:  # checkpoint file name patterns keep their leading zeros
        return text
    try:
        return yaml.load(text, Loader=ConfigLoader)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise UserError(f"override {key}=... is not a valid YAML value ({problem}); quote the value or fix it")


def _delete(cfg: DictConfig, dotpath: str, config_file: str) -> None:
    parent_path, _, name = dotpath.rpartition(".")
    parent = OmegaConf.select(cfg, parent_path) if parent_path else cfg
    if not isinstance(parent, DictConfig) or name not in parent:
        raise UserError(f"~{dotpath}: {config_file} has no key {dotpath} to remove; check the spelling")
    del parent[name]


def apply_overrides(cfg: DictConfig, overrides: list[str], config_file: str) -> DictConfig:
    """Merge ``key=value`` and ``~key`` onto the file's config, left to right."""
    for arg in overrides:
        if arg.startswith("~"):
            dotpath = arg[1:].split("=")[0]
            if "_component_" in dotpath:
                raise UserError(f"{arg}: a component's _component_ cannot be removed; remove the whole section")
            _delete(cfg, dotpath, config_file)
            continue
        key, eq, text = arg.partition("=")
        if not eq or not key:
            raise UserError(
                f"override '{arg}' is not key=value; write e.g. batch_size=2 (nested keys: model.lora_rank=16)"
            )
        if any(not part for part in key.split(".")):
            raise UserError(f"override '{arg}' has an empty key part; write nested keys as section.key=value")
        value = _value(key, text)
        section = cfg.get(key) if "." not in key else None
        if isinstance(section, DictConfig) and "_component_" in section:
            if not isinstance(value, str):  # `val_dataset=null` turns a section off; a list or mapping replaces it
                cfg[key] = value
                continue
            key += "._component_"  # `model=torchtune.models...` replaces the component, keeps its arguments
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise UserError(f"override '{arg}' cannot be applied ({str(e).strip().splitlines()[0]})")
    return cfg


def load_config(argv: list[str], description: str = "") -> DictConfig:
    """``--config FILE key=value ...`` as one DictConfig (interpolations not resolved); raise UserError on bad
    input. Not yet checked: ``load`` adds the typed settings (``settings.parse``)."""
    config_file, overrides = parse_args(argv, description)
    try:
        cfg = OmegaConf.create(read_yaml(config_file))
    except OmegaConfBaseException as e:
        raise UserError(f"{config_file}: {str(e).strip().splitlines()[0]}")
    return apply_overrides(cfg, overrides, config_file)


@dataclass(frozen=True)
class Loaded:
    """A config as given on a command line: its file, the merged DictConfig and the checked settings."""

    source: settings.Origin
    cfg: DictConfig
    settings: settings.RecipeSettings


def load(argv: list[str], description: str = "") -> Loaded:
    """``--config FILE key=value ...`` read, merged and checked once; raises UserError on bad input."""
    file, overrides = parse_args(argv, description)
    source = settings.Origin(file, overrides)
    cfg = load_config(argv, description)
    return Loaded(source, cfg, settings.parse(cfg, source))


def with_overrides(config: Loaded, overrides: list[str]) -> Loaded:
    """The config with more ``key=value`` overrides (a memory plan's choice), checked again."""
    cfg = apply_overrides(config.cfg.copy(), overrides, config.source)
    source = settings.Origin(config.source, [*config.source.overrides, *overrides])
    return Loaded(source, cfg, settings.parse(cfg, source))
