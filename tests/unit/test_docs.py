"""README.md and docs/: the README stays a landing page, links resolve, the config reference is current, and the
commands, files, make targets and config keys the pages name exist."""

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

from lora_tools.config import reference, settings

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PLACEHOLDERS = {"RECIPE.py", "CONFIG.yaml"}  # `tune run RECIPE.py --config CONFIG.yaml`
README_LIMIT = 15_000  # bytes: "at most 15 KB", read as 15,000 to hold under either meaning of KB

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`\n]+)`")


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _shell_lines(page: Path) -> list[str]:
    """What the page gives to type: bash code blocks (continuations joined, comments cut), and inline code that is
    a command or a single word (`configs/tiny.yaml`, `batch_size=0`), not a Python call or a placeholder."""
    text = _text(page)
    lines = []
    for lang, body in CODE_BLOCK.findall(text):
        if lang == "bash":
            lines += [line.split(" #")[0] for line in body.replace("\\\n", " ").splitlines()]
    for span in INLINE_CODE.findall(CODE_BLOCK.sub("", text)):
        if span != "key=value" and (" " not in span or re.match(r"(tune|python|make|dotenv|ollama|wandb) ", span)):
            lines.append(span)
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_a_landing_page():
    size = len((REPO / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move detail into docs/"
    # it sends readers on: every docs page is linked from the README
    linked = {Path(t.split("#")[0]).name for t in LINK.findall(_text(REPO / "README.md"))}
    assert {p.name for p in PAGES[1:]} <= linked, sorted({p.name for p in PAGES[1:]} - linked)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(page):
    """Each relative link names an existing file, and an anchor into a Markdown file names one of its headings."""
    broken = []
    for target in LINK.findall(_text(page)):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(REPO)}")
        elif anchor and dest.suffix == ".md":
            headings = {_slug(h) for h in re.findall(r"^#+ (.*)$", _text(dest), re.M)}
            if anchor not in headings:
                broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert broken == [], f"{page.relative_to(REPO)}: {broken}"


def test_config_reference_is_current():
    current = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert current == reference.render(), f"docs/config.md is stale; regenerate it with: {reference.COMMAND}"


def test_config_reference_lists_every_key_with_its_default():
    """The generated table itself: one row per settings key, required keys marked, defaults as YAML writes them."""
    rows = {}
    for line in reference.render().splitlines():
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if len(cells) == 5 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    assert list(rows) == list(settings.docs())
    assert rows["batch_size"][2] == "required" and rows["batch_size"][3] == "greater than 0"
    assert rows["gradient_accumulation_steps"][1:3] == ["int", "`1`"]
    assert rows["seed"][1:3] == ["int or null", "`null`"]
    assert rows["val_dataset"][1] == "section or list of sections or null"
    assert rows["sample_prompts"][1:3] == ["list of str", "`[]`"]
    assert "`num_training_steps` given by the recipe" in rows["lr_scheduler"][3]


def test_named_commands_exist():
    """Every `python -m <module>` names a module that Python finds, and every `make <target>` a Makefile target."""
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
    missing = []
    for page in PAGES:
        for line in _shell_lines(page):
            # .venv-vllm's modules: tests/test_vllm.py runs them (make test-vllm)
            for module in re.findall(r"(?<!venv-vllm/bin/)python -m (\S+)", line):
                if "<" not in module and importlib.util.find_spec(module) is None:
                    missing.append(f"{page.name}: python -m {module}")
            for target in re.findall(r"(?:^|&& |; )make ([\w-]+)", line):
                if target not in targets:
                    missing.append(f"{page.name}: make {target}")
    assert missing == []


def test_named_repository_files_exist():
    """Every file or folder of the repository a page names in code (configs/, tests/, bench/, ...) exists."""
    missing = []
    for page in PAGES:
        for line in _shell_lines(page):
            for token in line.split():
                path = token.strip("`'\",;()")
                is_repo_path = re.match(r"(configs|tests|bench|evals|docs|lora_tools)/[\w./-]*$", path)
                is_top_file = re.fullmatch(r"[A-Za-z][\w-]*\.(py|yaml|md)", path) and path not in PLACEHOLDERS
                if (is_repo_path or is_top_file) and "*" not in path and not (REPO / path).exists():
                    missing.append(f"{page.name}: {path}")
    assert missing == []


def test_named_config_keys_exist():
    """Every `key=value` override a page shows sets a key the settings declare (a dotted key: inside a section)."""
    fields = {f.name: f for f in dataclasses.fields(settings.RecipeSettings)}
    sections = {name for name, f in fields.items() if reference.type_name(f.type).startswith("section")}
    unknown, seen = [], 0
    for page in PAGES:
        for line in _shell_lines(page):
            for token in line.split():
                m = re.fullmatch(r"[\"']?([a-z_][a-z0-9_.]*)=\S+", token)
                if not m:
                    continue
                seen += 1
                key, _, inner = m.group(1).partition(".")
                if key not in fields or (inner and key not in sections):
                    unknown.append(f"{page.name}: {m.group(1)}")
    assert seen >= 10 and unknown == [], unknown


def test_layout_names_every_package_and_command():
    """docs/layout.md names each package of lora_tools and each command module (one with a __main__ guard)."""
    layout = _text(REPO / "docs" / "layout.md")
    package = REPO / "lora_tools"
    packages = [p.name for p in package.iterdir() if (p / "__init__.py").exists()]
    commands = [p.stem for p in package.glob("*.py") if 'if __name__ == "__main__"' in p.read_text()]
    assert packages and commands
    missing = [n for n in packages if f"{n}/" not in layout]
    missing += [n for n in commands if f"{n}.py" not in layout and f"{n}/" not in layout]
    assert missing == [], missing
