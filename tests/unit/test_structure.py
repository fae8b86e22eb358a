"""Unit tier: the design rules a reader relies on, checked on the source text."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPES = [REPO / "lora_finetune_single_device.py", REPO / "lora_finetune_distributed.py"]
HELPERS = sorted((REPO / "lora_tools").glob("*.py"))
PRIVATE_TORCHTUNE = re.compile(r"torchtune(\.\w+)*\._\w+|\b_(checkpointer|tokenizer|model)\._\w+|config\._utils")


def test_no_helper_module_uses_a_private_torchtune_name():
    offenders = [
        f"{path.name}:{n}: {line.strip()}"
        for path in HELPERS + RECIPES
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if PRIVATE_TORCHTUNE.search(line)
    ]
    assert offenders == []


def test_no_module_is_patched_at_run_time():
    for path in HELPERS + RECIPES:
        assert "object.__setattr__" not in path.read_text(), path.name


def test_no_recipe_subclasses_another():
    recipe_classes = {
        node.name
        for path in RECIPES
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
    }
    for path in RECIPES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases}
                assert not bases & recipe_classes, (path.name, node.name, bases)


def test_no_test_hook_in_product_code():
    for path in HELPERS + RECIPES:
        assert not re.search(r"os\.environ\.get\([\"']LORA_TOOLS_", path.read_text()), path.name
