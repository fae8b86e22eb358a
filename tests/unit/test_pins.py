"""Every third-party package the project's Python files import is pinned with `==` in the requirements file of
the environment that runs them.

- the recipes, wb.py, lora_tools/ and bench/ run in .venv: requirements.txt, or requirements-gguf.txt for
  llama.cpp's quantizer (an optional install: it compiles llama.cpp);
- tests/ run in .venv with the test tools: those, or requirements-test.txt;
- tests/hf_*.py (transformers, peft, TRL) and bench/trl_sft.py run only in .venv-hf.

The files are found when the test runs, so modules added later are checked too.
"""

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HF_ONLY = {
    "tests/hf_logits.py",
    "tests/hf_chat_template.py",
    "tests/hf_generate.py",
    "tests/hf_preference_loss.py",
    "tests/hf_preference_tokens.py",
    "bench/trl_sft.py",
}
HF_PYTHON = REPO / ".venv-hf" / "bin" / "python"
ALLOWED = {
    "runtime": ["requirements.txt", "requirements-gguf.txt"],
    "test": ["requirements.txt", "requirements-gguf.txt", "requirements-test.txt"],
    "hf": ["requirements-hf.txt"],
}


def shipped_files() -> list[Path]:
    files = sorted(REPO.glob("*.py"))
    for folder in ("lora_tools", "bench", "tests"):
        files += sorted((REPO / folder).rglob("*.py"))
    return files


def own_modules() -> set[str]:
    """The project's own import names: its packages, the recipe files and the test helper modules."""
    names = {"lora_tools", "bench", "tests"} | {p.stem for p in REPO.glob("*.py")}
    return names | {p.stem for p in (REPO / "tests").rglob("*.py")}


def environment(path: Path) -> str:
    rel = path.relative_to(REPO).as_posix()
    if rel in HF_ONLY:
        return "hf"
    return "test" if rel.startswith("tests/") else "runtime"


def imported_names(path: Path) -> set[str]:
    """Top-level names of absolute imports anywhere in the file (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: Path) -> set[str]:
    """Normalized names of the distributions pinned with `==` (extras dropped)."""
    pinned = set()
    for line in requirements.read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*==\s*\S+", line.split("#")[0])
        if m:
            pinned.add(normalize(m.group(1)))
    return pinned


@cache
def distributions(env: str) -> dict[str, list[str]]:
    """Import name -> distributions, from the environment the file runs in (.venv-hf when it exists)."""
    mapping = {k: list(v) for k, v in importlib.metadata.packages_distributions().items()}
    if env == "hf" and HF_PYTHON.exists():
        code = "import importlib.metadata as m, json; print(json.dumps(m.packages_distributions()))"
        out = subprocess.run([str(HF_PYTHON), "-c", code], capture_output=True, text=True, check=True).stdout
        mapping.update(json.loads(out))
    return mapping


def unpinned(files: list[Path], repo: Path = REPO, own: set[str] | None = None) -> list[str]:
    """One line per (file, imported distribution) that lacks an `==` pin where that file runs."""
    own = own_modules() if own is None else own
    problems = []
    for path in files:
        env = environment(path) if repo == REPO else "runtime"
        allowed = [name for name in ALLOWED[env] if (repo / name).is_file()]
        pinned = set().union(*(pins(repo / name) for name in allowed))
        for name in sorted(imported_names(path) - set(sys.stdlib_module_names) - own):
            # An import name that maps to no installed distribution is taken as its own distribution name.
            dists = distributions(env).get(name) or [name]
            if not any(normalize(d) in pinned for d in dists):
                rel = path.relative_to(repo)
                problems.append(
                    f"{rel} imports {name} (package {'/'.join(dists)}): no == pin in {' or '.join(allowed)}"
                )
    return problems


def test_every_imported_package_is_pinned():
    files = shipped_files()
    assert {"lora_tools", "bench", "tests"} <= {p.relative_to(REPO).parts[0] for p in files}
    assert any(p.name == "trl_sft.py" for p in files) and any(p.name == "wb.py" for p in files)
    problems = unpinned(files)
    assert not problems, "\n".join(problems)


def test_an_unpinned_import_is_named(tmp_path):
    (tmp_path / "requirements.txt").write_text("torch==2.13.0\nnumpy>=2  # not an == pin\n")
    module = tmp_path / "module.py"
    module.write_text("import os\nimport torch.nn\nfrom yaml import safe_load\n\ndef f():\n    import numpy\n")
    problems = unpinned([module], repo=tmp_path, own=set())
    assert problems == [
        "module.py imports numpy (package numpy): no == pin in requirements.txt",
        "module.py imports yaml (package PyYAML): no == pin in requirements.txt",
    ]
