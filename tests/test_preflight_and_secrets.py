"""Issue B: one-line preflight failures before any weights load, wb.py, downloads, and secrets kept out of outputs."""

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO, TORCHAO_NOTICE, logged_metrics, offline_env
from fake_hub import FakeHub
from wandb_records import history

FAKE_HF_TOKEN = "hf_FAKEtestTOKENfortheSecretsTest0123456789"
FAKE_WANDB_KEY = "f4ke0000test1111key2222made3333up4444555"  # 40 characters, made up for this test
assert len(FAKE_WANDB_KEY) == 40


def error_lines(result) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith(TORCHAO_NOTICE)]


def assert_fails_in_one_line(result, out: Path, *needles, status=2):
    text = result.stdout + result.stderr
    assert result.returncode == status, text[-2000:]
    assert "Traceback" not in text
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir()), list(out.rglob("*"))


@pytest.fixture
def run_tiny(tmp_path, run_in_process):
    """conftest.run_in_process into tmp_path/out (the recipe's `tune run` entry point in this process;
    tests/test_bad_inputs.py runs three cases through the real `tune run` too). Returns (result, output_dir)."""

    def run(*overrides, env=None, config="configs/tiny.yaml"):
        out = tmp_path / "out"
        return run_in_process(out, *overrides, env=env, config=config), out

    return run


# --- preflight: each case through the recipe's `tune run` entry point -------------------------------------------


def test_missing_checkpoint_prints_download_command_fast(run_tiny):
    start = time.monotonic()
    result, out = run_tiny(
        "device=cpu",
        "dtype=fp32",
        "compile=False",
        "enable_activation_offloading=False",
        "metric_logger._component_=torchtune.training.metric_logging.DiskLogger",
        config="lora_finetune_single_device.yaml",
    )
    elapsed = time.monotonic() - start
    expected = "python -m lora_tools.download meta-llama/Llama-3.2-3B-Instruct --output-dir ckpts/Llama-3.2-3B-Instruct"
    assert_fails_in_one_line(result, out, expected)
    print(f"3B checkpoint missing: refused in {elapsed:.1f} s")


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["checkpointer.checkpoint_files=[missing.safetensors]"], ["missing.safetensors", "tiny_assets"]),
        (["tokenizer.path=assets/tiny/original/missing.model"], ["tokenizer.path", "missing.model"]),
        (["device=cuda"], ["no CUDA GPU", "device=cpu", "configs/tiny.yaml"]),
        (["enable_activation_offloading=True"], ["enable_activation_offloading", "CUDA"]),
        (["dataset.data_files=assets/tiny/data/absent.json"], ["absent.json", "does not exist"]),
    ],
    ids=["checkpoint-file", "tokenizer", "cuda", "offloading", "dataset-file"],
)
def test_preflight_case(run_tiny, overrides, needles):
    result, out = run_tiny(*overrides)
    assert_fails_in_one_line(result, out, *needles)


def test_unparseable_dataset_file(tmp_path, run_tiny):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "input": "", "output": "b"},\n{not json\n')
    result, out = run_tiny(f"dataset.data_files={bad}")
    assert_fails_in_one_line(result, out, str(bad), "not valid JSON")


def test_bad_json_lines_row_names_its_line(tmp_path, run_tiny):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "c", "input": ""\n')
    result, out = run_tiny(f"dataset.data_files={bad}")
    assert_fails_in_one_line(result, out, str(bad), "not valid JSON (line 2")


def test_dataset_row_missing_a_field(tmp_path, run_tiny):
    bad = tmp_path / "rows.json"
    rows = [{"instruction": "a", "input": "", "output": "b"}] * 2 + [{"instruction": "c", "input": ""}]
    bad.write_text(__import__("json").dumps(rows))
    result, out = run_tiny(f"dataset.data_files={bad}")
    assert_fails_in_one_line(result, out, str(bad), "row 3", "'output'")


def test_wandb_without_credentials(tmp_path, run_tiny):
    env = {"HOME": str(tmp_path), "WANDB_MODE": None, "WANDB_API_KEY": None}  # no ~/.netrc from a `wandb login`
    result, out = run_tiny("metric_logger._component_=torchtune.training.metric_logging.WandBLogger", env=env)
    assert_fails_in_one_line(result, out, "WANDB_API_KEY", "python wb.py", "WANDB_MODE=offline")


def test_output_dir_not_writable(tmp_path, run_in_process):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "out"
    result = run_in_process(out)
    assert_fails_in_one_line(result, out, "output_dir", "is a file")


def test_not_enough_disk(tmp_path):
    """A 1 MiB tmpfs (private mount namespace) cannot hold the 13 MB merged tiny model."""
    small = tmp_path / "small"
    small.mkdir()
    out = small / "out"
    cmd = (
        f"mount -t tmpfs -o size=1M tmpfs {small} && cd {REPO} && exec {sys.executable} -m torchtune._cli.tune "
        f"run lora_finetune_single_device.py --config configs/tiny.yaml output_dir={out}"
    )
    result = subprocess.run(["unshare", "-m", "sh", "-c", cmd], env=offline_env(), capture_output=True, text=True)
    assert_fails_in_one_line(result, out, "not enough disk", "save_adapter_weights_only=True")


def test_compile_without_a_compiler(tmp_path, run_tiny):
    result, out = run_tiny("compile=True", env={"PATH": str(tmp_path / "empty-bin")})
    assert_fails_in_one_line(result, out, "compile", "C++ compiler")


# --- wb.py ---------------------------------------------------------------------------------------------------


def wb(tmp_path, **env_vars):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), **env_vars)
    return subprocess.run(
        [sys.executable, str(REPO / "wb.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def assert_wb_one_line(result, status, *needles):
    assert result.returncode == status, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert FAKE_WANDB_KEY not in result.stdout + result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0]


def test_wb_help():
    result = subprocess.run([sys.executable, "wb.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and "WANDB_API_KEY" in result.stdout


def test_wb_missing_key(tmp_path):
    assert_wb_one_line(wb(tmp_path), 2, "WANDB_API_KEY", ".env")


def test_wb_no_network(tmp_path):
    (tmp_path / ".env").write_text(f"WANDB_API_KEY={FAKE_WANDB_KEY}\n")
    assert_wb_one_line(wb(tmp_path), 1, "could not reach W&B", "WANDB_MODE=offline", "wandb sync")


def test_wb_key_of_the_wrong_shape_is_refused_before_any_network(tmp_path):
    (tmp_path / ".env").write_text("WANDB_API_KEY=abc123456789\n")
    result = wb(tmp_path)
    assert_wb_one_line(result, 2, "WANDB_API_KEY in .env has the wrong shape", "has 12", "wandb.ai/authorize")
    assert "abc123456789" not in result.stdout + result.stderr


def test_wb_malformed_env_line(tmp_path):
    (tmp_path / ".env").write_text(f"WANDB_MODE=offline\nWANDB_API_KEY {FAKE_WANDB_KEY}\n")
    assert_wb_one_line(wb(tmp_path), 2, ".env line 2 is not KEY=value", "fix or remove that line")


class _RejectingWandb(BaseHTTPRequestHandler):
    def _answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"errors": [{"message": "user is not logged in"}]}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


def test_wb_key_rejected(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RejectingWandb)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (tmp_path / ".env").write_text(f"WANDB_API_KEY={FAKE_WANDB_KEY}\n")
        result = wb(tmp_path, WANDB_BASE_URL=f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert_wb_one_line(result, 1, "rejected", "wandb.ai/authorize")


# --- downloads with the real huggingface_hub client ----------------------------------------------------------


def download(tmp_path, repo_id, **env_vars):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(env_vars)
    cmd = [sys.executable, "-m", "lora_tools.download", repo_id, "--output-dir", str(tmp_path / "ckpt")]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def assert_download_fails(result, *needles):
    text = result.stdout + result.stderr
    assert result.returncode == 1, text
    assert "Traceback" not in text and FAKE_HF_TOKEN not in text
    (line,) = error_lines(result)
    for needle in needles:
        assert needle in line, line


def test_download_without_network(tmp_path):
    result = download(tmp_path, "meta-llama/Llama-3.2-3B-Instruct", HF_TOKEN=FAKE_HF_TOKEN)
    assert_download_fails(result, "cannot reach the Hugging Face Hub")


def test_download_gated_and_not_found(tmp_path):
    with FakeHub() as hub:
        gated = download(tmp_path, "gated-org/model", HF_ENDPOINT=hub.url, HF_TOKEN=FAKE_HF_TOKEN)
        gated_no_token = download(tmp_path, "gated-org/model", HF_ENDPOINT=hub.url)
        missing = download(tmp_path, "nobody/nothing", HF_ENDPOINT=hub.url, HF_TOKEN=FAKE_HF_TOKEN)
    assert_download_fails(gated, "request access on https://huggingface.co/gated-org/model")
    assert_download_fails(gated_no_token, "HF_TOKEN is not set")
    assert_download_fails(missing, "nobody/nothing not found")


def test_download_reports_a_malformed_env_without_importing_torch(tmp_path):
    (tmp_path / ".env").write_text(f"HF_TOKEN {FAKE_HF_TOKEN}\n")
    script = (
        "import sys; from lora_tools import download; status = download.main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules; sys.exit(status)"
    )
    cmd = [sys.executable, "-c", script, "meta-llama/Llama-3.2-1B", "--output-dir", str(tmp_path / "ckpt")]
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and FAKE_HF_TOKEN not in result.stdout + result.stderr
    (line,) = error_lines(result)
    assert line.startswith("error: .env line 1 is not KEY=value"), line


# --- secrets never leave .env; the offline W&B run holds the recipe's losses ---------------------------------


def test_secrets_stay_out_of_outputs_and_wandb_offline_run(tmp_path):
    workdir = tmp_path / "work"  # a checkout whose .env holds fake secrets (the repo's own .env is left alone)
    workdir.mkdir()
    for name in ("lora_finetune_single_device.py", "lora_tools", "configs", "assets"):
        (workdir / name).symlink_to(REPO / name)
    (workdir / ".env").write_text(f"HF_TOKEN={FAKE_HF_TOKEN}\nWANDB_API_KEY={FAKE_WANDB_KEY}\nWANDB_MODE=offline\n")
    env = {k: v for k, v in offline_env().items() if k not in ("WANDB_MODE", "WANDB_API_KEY", "HF_TOKEN")}
    env["HOME"] = str(tmp_path)

    def run(out, *overrides):
        cmd = [sys.executable, "-m", "torchtune._cli.tune", "run", "lora_finetune_single_device.py"]
        cmd += ["--config", "configs/tiny.yaml", f"output_dir={out}", "max_steps_per_epoch=6", *overrides]
        result = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    wandb_out = tmp_path / "wandb_run"
    result = run(wandb_out, "metric_logger._component_=torchtune.training.metric_logging.WandBLogger")
    files = [p for p in wandb_out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    for text in [result.stdout, result.stderr] + [p.read_bytes().decode("latin-1") for p in files]:
        assert FAKE_HF_TOKEN not in text and FAKE_WANDB_KEY not in text

    # The same run with the disk logger: W&B must hold exactly the losses the recipe logged, step by step.
    disk_out = tmp_path / "disk_run"
    run(disk_out)
    expected = {s: m["loss"] for s, m in logged_metrics(disk_out).items() if "loss" in m}
    (run_file,) = wandb_out.rglob("run-*.wandb")
    logged = {s: m["loss"] for s, m in history(run_file).items() if "loss" in m}
    assert sorted(logged) == sorted(expected) == list(range(1, 7))
    assert logged == expected  # the same run's floats, written to two places: exact
