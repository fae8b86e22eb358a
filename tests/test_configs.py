"""Shipped configs are well-formed, match the tiny assets, and bad configs fail in one line."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY, TINY_CONFIG, TORCHAO_NOTICE, recipe_in_process, tune

SHIPPED_CONFIGS = [REPO / "lora_finetune_single_device.yaml", *sorted((REPO / "configs").glob("*.yaml"))]


def tune_in_process(monkeypatch, capfd, *args) -> subprocess.CompletedProcess:
    """The `tune` command's own entry point (torchtune._cli.tune.main) in this process, sys.argv as the console
    script sets it: exit status and output as ``tune(*args)`` returns them, without its ~10 s of imports."""
    from torchtune._cli import tune as tune_cli

    monkeypatch.setattr(sys, "argv", ["tune", *args])
    capfd.readouterr()
    try:
        tune_cli.main()
        status = 0
    except SystemExit as e:  # argparse's error() exits 2
        status = e.code if isinstance(e.code, int) else 1
    captured = capfd.readouterr()
    return subprocess.CompletedProcess(sys.argv, status, captured.out, captured.err)


@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_tune_validate_passes(config, monkeypatch, capfd):
    result = tune_in_process(monkeypatch, capfd, "validate", str(config.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Config is well-formed!" in result.stdout


def test_tune_validate_through_the_real_command():
    """The same command as an installed `tune validate`, imports included (the others run in-process)."""
    result = tune("validate", str(SHIPPED_CONFIGS[0].relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Config is well-formed!" in result.stdout


def test_tune_validate_refuses_a_broken_config(tmp_path, monkeypatch, capfd):
    """The in-process validate can fail: an argument the loss does not take is refused, exit status 2."""
    cfg = yaml.safe_load(TINY_CONFIG.read_text())
    cfg["loss"]["no_such_argument"] = 1
    config = tmp_path / "broken.yaml"
    config.write_text(yaml.safe_dump(cfg))
    result = tune_in_process(monkeypatch, capfd, "validate", str(config))
    assert result.returncode == 2 and "Config is well-formed!" not in result.stdout, result.stdout + result.stderr
    assert "no_such_argument" in result.stderr


def test_tiny_config_matches_generated_assets():
    model = yaml.safe_load(TINY_CONFIG.read_text())["model"]
    hf = json.loads((TINY / "config.json").read_text())
    assert model["vocab_size"] == hf["vocab_size"]
    assert model["embed_dim"] == hf["hidden_size"]
    assert model["num_layers"] == hf["num_hidden_layers"]
    assert model["num_heads"] == hf["num_attention_heads"]
    assert model["num_kv_heads"] == hf["num_key_value_heads"]
    assert model["intermediate_dim"] == hf["intermediate_size"]


def _assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    # torchao prints one notice when `tune` imports it, before any project code runs (see requirements.txt).
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(TORCHAO_NOTICE)]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# In-process through the recipe's `tune run` entry point; the malformed override goes through the real `tune run`.


@pytest.mark.parametrize("key", ["optimizer", "model", "checkpointer", "batch_size"])
def test_missing_required_key_is_one_line(tmp_path, key, monkeypatch, capfd):
    cfg = yaml.safe_load(TINY_CONFIG.read_text())
    del cfg[key]
    out = tmp_path / "out"
    cfg["output_dir"] = str(out)
    config = tmp_path / "broken.yaml"
    config.write_text(yaml.safe_dump(cfg))
    result = recipe_in_process(monkeypatch, capfd, "--config", config)
    _assert_one_line_error(result, f"'{key}'", "broken.yaml")
    assert not out.exists()


def test_missing_config_file_is_one_line(tmp_path, monkeypatch, capfd):
    result = recipe_in_process(monkeypatch, capfd, "--config", tmp_path / "nope.yaml")
    _assert_one_line_error(result, "nope.yaml", "not found")


def test_malformed_override_is_one_line(tmp_path):
    result = tune("run", "lora_finetune_single_device.py", "--config", str(TINY_CONFIG), "batch_size")
    _assert_one_line_error(result, "key=value")
    assert not Path(REPO / "outputs" / "never").exists()


def test_tune_cli_works_after_install():
    assert tune("--help").returncode == 0
    listing = tune("ls")
    assert listing.returncode == 0, listing.stderr
    assert "lora_finetune_single_device" in listing.stdout


def test_tiny_assets_rebuild_byte_for_byte(tmp_path):
    from lora_tools.demo.assets import build

    build(tmp_path)
    rebuilt = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert rebuilt == sorted(p.relative_to(TINY) for p in TINY.rglob("*") if p.is_file())
    for rel in rebuilt:
        assert (tmp_path / rel).read_bytes() == (TINY / rel).read_bytes(), rel


def test_every_command_in_the_docs_answers_help():
    """Each `python -m lora_tools.<cmd>` that README.md or docs/ shows runs and prints its usage (one Python
    process runs them all as `python -m` would, to spare the imports: runpy with run_name "__main__")."""
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "Makefile"]
    found = {m.rstrip(".") for doc in docs for m in re.findall(r"python -m (lora_tools[\w.]*)", doc.read_text())}
    commands = sorted(found - {"lora_tools"})
    assert {"lora_tools.data", "lora_tools.export", "lora_tools.plan", "lora_tools.tiny_assets"} <= set(commands)
    script = (
        "import runpy, sys\n"
        "for module in sys.argv[1:]:\n"
        "    sys.argv = [module, '--help']\n"
        "    try:\n"
        "        runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
        "    except SystemExit as e:\n"
        "        print(f'@@ {module} exit {e.code}', flush=True)\n"
        "    else:\n"
        "        print(f'@@ {module} returned without exiting', flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *commands], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    for module, usage in zip(commands, result.stdout.split("@@ ")[:-1], strict=True):
        assert "usage:" in usage.lower(), (module, usage[-500:])
    assert re.findall(r"@@ (\S+) exit (\S+)", result.stdout) == [(m, "0") for m in commands], result.stdout[-2000:]
