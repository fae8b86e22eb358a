"""Unit tier: the design rules a reader relies on, checked on the source text."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPES = [REPO / "lora_finetune_single_device.py", REPO / "lora_finetune_distributed.py"]
HELPERS = sorted((REPO / "lora_tools").rglob("*.py"))
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


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_of_lora_tools() -> dict[str, set[str]]:
    """Every lora_tools module and the lora_tools modules it imports, at the top or inside a function."""
    paths = sorted((REPO / "lora_tools").rglob("*.py"))
    modules = {_module_name(p): p for p in paths}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, one level up per extra dot
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def test_lora_tools_imports_have_no_circle():
    """No chain of imports leads from a lora_tools module back to itself (a depth-first search over the import
    statements of every module, lazy ones inside functions included)."""
    graph = _imports_of_lora_tools()
    assert "lora_tools.config.loader" in graph and "lora_tools.config.loader" in graph["lora_tools.plan"]
    state: dict[str, str] = {}
    circles = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_only_the_recipes_import_the_launcher():
    """Commands read configs through lora_tools.config.loader; the launcher is the recipes' entry point."""
    graph = _imports_of_lora_tools()
    assert [m for m, targets in graph.items() if "lora_tools.train.launch" in targets] == []


def _depth(node: ast.AST) -> int:
    """How deep blocks (if/for/while/with/try/match) nest inside ``node``'s body."""
    blocks = (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.Match, ast.AsyncFor, ast.AsyncWith)
    inner = [_depth(child) for child in ast.iter_child_nodes(node)]
    return (1 if isinstance(node, blocks) else 0) + max(inner, default=0)


def test_train_reads_top_to_bottom():
    """The loop of the single-device recipe nests at most 3 blocks deep, and the recipe file stays under 500
    lines (torchtitan keeps train() to training; the rest lives in lora_tools)."""
    source = RECIPES[0].read_text()
    recipe = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "LoRAFinetuneRecipe")
    train = next(n for n in recipe.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert max(_depth(statement) for statement in train.body) <= 3
    assert len(source.splitlines()) < 500
