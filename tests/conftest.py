"""Shared test helpers: the repo root, the tiny assets, and running the real `tune` command."""

import fcntl
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lora_tools.checkpoints import latest_checkpoint, load_recipe_state

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "assets" / "tiny"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
TUNE = str(Path(sys.executable).parent / "tune")
TORCHAO_NOTICE = "Skipping import of cpp extensions due to incompatible torch version"

# ---- tolerances derived from float32 rounding ----
# Two runs that do the same arithmetic in another order (other batch shapes, other kernels on another CPU, sums
# split across processes) round differently. A sum of n float32 terms, modelling each rounding error as
# independent with mean zero, is off from the exact sum by at most LAMBDA * sqrt(n) * U32 * sum(|term|), except
# with probability below 2n * exp(-LAMBDA**2 / 2) (Higham & Mary, "A new approach to probabilistic rounding error
# analysis", SIAM J. Sci. Comput. 41(5), 2019, Theorem 3.1): below 1e-6 for n = 2**14 with LAMBDA = 7. Two
# orders differ by at most twice that. The tests take the magnitude of a quantity (a loss, a gradient norm) as
# the sum of its terms' magnitudes, which holds when the terms do not cancel.
U32 = 2.0**-24
LAMBDA = 7.0


def rounding(n: int) -> float:
    """Relative difference two float32 summation orders of n terms can make (see above)."""
    return 2 * LAMBDA * math.sqrt(n) * U32


def sgd_travel(out: Path, filename: str, momentum: float) -> dict[int, float]:
    """By step t, how far SGD with this momentum could have moved any weight: the sum over steps s <= t of
    lr_s * |momentum buffer_s|, the buffer bounded by the logged gradient norms (sum of momentum**(s-r) * |g_r|).
    A relative gradient error eps at every step moves the weights apart by at most eps times this."""
    lr, grad_norm = per_step(out, filename, "lr"), per_step(out, filename, "grad_norm")
    travel, buffer, total = {}, 0.0, 0.0
    for step in sorted(lr):
        buffer = momentum * buffer + grad_norm[step]
        total += lr[step] * buffer
        travel[step] = total
    return travel


@pytest.fixture(scope="session", autouse=True)
def tiny_assets():
    """Build the tiny assets once if `make assets` has not."""
    if not (TINY / "model.safetensors").exists():
        subprocess.run([sys.executable, "-m", "lora_tools.tiny_assets", "--out", str(TINY)], cwd=REPO, check=True)
    return TINY


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    # Configs use paths relative to the repository root, as users run them.
    monkeypatch.chdir(REPO)


def offline_env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    env.update(extra)
    return env


def tune(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run the real `tune` CLI from the repository root and capture its output."""
    return subprocess.run(
        [TUNE, *args], cwd=REPO, env=env or offline_env(), capture_output=True, text=True, timeout=timeout
    )


def tiny_cfg(**overrides):
    """configs/tiny.yaml with key=value overrides, as `tune run` would merge them."""
    cfg = OmegaConf.load(TINY_CONFIG)
    dotlist = [f"{k}={v}" for k, v in overrides.items()]
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))


def logged_metrics(output_dir: Path, filename: str | None = None) -> dict[int, dict[str, float]]:
    """Per-step metrics from torchtune's DiskLogger file under output_dir/logs (the only one, or ``filename``)."""
    logs = Path(output_dir) / "logs"
    (log_file,) = [logs / filename] if filename else logs.glob("log_*.txt")
    steps: dict[int, dict[str, float]] = {}
    for line in log_file.read_text().splitlines():
        m = re.match(r"Step (\d+) \| (.*)", line)
        if m:
            pairs = dict(kv.split(":", 1) for kv in m.group(2).split())
            steps.setdefault(int(m.group(1)), {}).update({k: float(v) for k, v in pairs.items()})
    return steps


def assert_scores_as_documented(printed: str, doc: str, task: str, n: int, flips: int = 2) -> None:
    """The score table line a run printed for ``task`` against the one ``doc`` shows: the same task and metric, and
    base, finetuned and difference each within ``flips`` of the ``n`` answers. Another CPU's kernels (AVX2 or
    AVX-512, Intel or AMD) can flip a near-tie greedy token: an AMD EPYC scored 28 of the 30 demo answers that an
    Intel Xeon got all right. The stderr columns follow the scores and are not compared."""
    ours = next(x for x in printed.splitlines() if x.startswith(task + " ")).split()
    theirs = next(x for x in doc.splitlines() if x.startswith(task + " ")).split()
    assert ours[:-6] == theirs[:-6], (ours, theirs)
    for a, b in zip(ours[-6:-3], theirs[-6:-3], strict=True):
        assert abs(float(a) - float(b)) <= flips / n + 1e-4, (ours, theirs)


def tiny_vocab_size() -> int:
    return json.loads((TINY / "config.json").read_text())["vocab_size"]


def ln_vocab() -> float:
    return math.log(tiny_vocab_size())


HF_PYTHON = REPO / ".venv-hf" / "bin" / "python"
PROBE_TOKENS = [[857, 84, 104, 101, 678, 331, 498, 46, 405, 840, 346, 455, 331, 567, 46, 866]]


def recipe_logits(checkpoint: Path, tmp_path: Path, **overrides) -> torch.Tensor:
    """The recipe's own model (torchtune modules: base weights + the checkpoint's adapter) on PROBE_TOKENS."""
    from torchtune import config

    cfg = tiny_cfg(**overrides)
    model = config.instantiate(cfg.model)
    base = config.instantiate(cfg.checkpointer, output_dir=str(tmp_path / "unused")).load_checkpoint()["model"]
    model.load_state_dict(base, strict=False)
    adapter = load_recipe_state(checkpoint)["adapter"]
    model.load_state_dict(adapter, strict=False)
    with torch.no_grad():
        return model.eval()(torch.tensor(PROBE_TOKENS)).float()


def hf_logits(checkpoint: Path, tmp_path: Path, base: Path = TINY) -> dict[str, torch.Tensor]:
    """Logits on PROBE_TOKENS from the plain Hugging Face calls, run in .venv-hf (transformers + peft): the base,
    the checkpoint's adapter on it, and the checkpoint's merged model."""
    from safetensors.torch import load_file

    assert HF_PYTHON.exists(), "the Hugging Face test environment is missing: run `make test` (it builds .venv-hf)"
    tokens_file, out = tmp_path / "tokens.json", tmp_path / "hf.safetensors"
    tokens_file.write_text(json.dumps(PROBE_TOKENS))
    args = [base, checkpoint / "adapter", checkpoint / "model", tokens_file, out]
    result = subprocess.run([HF_PYTHON, REPO / "tests" / "hf_logits.py", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(out)


def tune_run(
    out: Path,
    *overrides,
    env=None,
    wait=True,
    nproc: int | None = None,
    torchrun_args=(),
    timeout=600,
    config="configs/tiny.yaml",
):
    """`tune run` of the tiny config (or ``config``) into ``out``: the single-device recipe, or with ``nproc`` the
    distributed one on that many CPU processes. Returns the Popen, finished (with stdout_text/stderr_text) unless
    wait=False."""
    if nproc is None:
        cmd = [TUNE, "run", "lora_finetune_single_device.py"]
    else:
        cmd = [TUNE, "run", *torchrun_args, "--nproc_per_node", str(nproc), "lora_finetune_distributed.py"]
    cmd += ["--config", config, f"output_dir={out}", *overrides]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env or offline_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if not wait:
        return proc
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    proc.stdout_text, proc.stderr_text = stdout, stderr
    return proc


def recipe_in_process(monkeypatch, capfd, *args, env=None) -> subprocess.CompletedProcess:
    """The single-device recipe in this process, through the entry point `tune run` calls (its ``main()`` with
    sys.argv as `tune run` sets it): exit status and output as ``tune("run", ...)`` returns them, without its
    ~10 s of imports. ``env`` sets variables (None unsets one) as the command's environment would; os.environ is
    put back afterwards (the recipe's .env loading writes it)."""
    import lora_finetune_single_device

    wanted = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", **(env or {})}
    for key, value in wanted.items():
        monkeypatch.delenv(key, raising=False) if value is None else monkeypatch.setenv(key, value)
    argv = ["lora_finetune_single_device.py", *map(str, args)]
    monkeypatch.setattr(sys, "argv", argv)
    saved = dict(os.environ)
    capfd.readouterr()  # only the run's own output counts
    try:
        status = lora_finetune_single_device.main()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    captured = capfd.readouterr()
    return subprocess.CompletedProcess(["tune", "run", *argv], status, captured.out, captured.err)


@pytest.fixture
def run_in_process(monkeypatch, capfd):
    """tune_run's single-device run of the tiny config into ``out``, in this process through the entry point
    `tune run` calls (recipe_in_process): the same result attributes, without ~10 s of imports per run. For runs
    that are not killed: a test that sends a signal needs a process of its own."""

    def run(out: Path, *overrides, env=None, config="configs/tiny.yaml") -> subprocess.CompletedProcess:
        args = ["--config", config, f"output_dir={out}", *overrides]
        result = recipe_in_process(monkeypatch, capfd, *args, env=env)
        result.stdout_text, result.stderr_text = result.stdout, result.stderr
        return result

    return run


def per_step(out: Path, filename: str, key: str) -> dict[int, float]:
    """One logged metric by step, for the steps that logged it."""
    return {step: m[key] for step, m in logged_metrics(out, filename).items() if key in m}


def losses(out: Path, filename: str) -> dict[int, float]:
    return per_step(out, filename, "loss")


def final_adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_recipe_state(latest_checkpoint(out))["adapter"]


def wait_for(predicate, timeout=300, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"run ended (status {proc.returncode}) before the condition held")
        time.sleep(0.02)
    raise AssertionError("timed out")


def pointer(out: Path) -> str | None:
    path = out / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else None


# What `make demo` adds to configs/tiny.yaml (the Makefile passes the same; test_configs checks it).
DEMO_EVAL = "eval_tasks=[tiny_qa,tiny_qa_gen]"
_DEMO = OmegaConf.load(TINY_CONFIG)
DEMO_STEPS, DEMO_VAL_EVERY = _DEMO.max_steps_per_epoch, _DEMO.run_val_every_n_steps  # the demo is one epoch
DEMO_STEP_DIR = f"step_{DEMO_STEPS:07d}"


# The demo runs that several test files read, each made once per session through the real `tune run`. They start
# in the background as soon as the session knows it needs them (pytest_collection_finish), so that no test process
# sits waiting while another makes them.
SHARED_RUNS = {
    "demo": ("--config", "configs/tiny.yaml", DEMO_EVAL),
    "chat_demo": ("--config", "configs/tiny_chat.yaml"),
    "tools_demo": ("--config", "configs/tiny_tools.yaml"),
}


def _shared_root(basetemp: Path) -> Path:
    return basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp  # the processes' common folder


def _start_shared_run(root: Path, name: str) -> Path:
    """Start the run in the background unless a test process already has; its record file, once it exists, holds
    the result (tests/shared_run.py writes it)."""
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not folder.exists():
            folder.mkdir()
            args = [sys.executable, REPO / "tests" / "shared_run.py", folder, *SHARED_RUNS[name]]
            with open(folder / "runner.log", "w") as log:
                subprocess.Popen(args, cwd=REPO, env=offline_env(), stdout=log, stderr=log, start_new_session=True)
    return folder / "record.json"


def pytest_collection_finish(session):
    needed = {name for name in SHARED_RUNS if any(name in item.fixturenames for item in session.items)}
    if needed and not session.config.option.collectonly:
        root = _shared_root(session.config._tmp_path_factory.getbasetemp())
        for name in sorted(needed):
            _start_shared_run(root, name)


def _shared_run(tmp_path_factory, name: str) -> tuple[Path, subprocess.CompletedProcess, float]:
    """The background run's result, once it has finished: (output_dir, result, seconds)."""
    record = _start_shared_run(_shared_root(tmp_path_factory.getbasetemp()), name)
    wait_for(record.exists, timeout=1800)
    fields = json.loads(record.read_text())
    seconds = fields.pop("seconds")
    result = subprocess.CompletedProcess(**fields)
    assert result.returncode == 0, result.stderr[-3000:]
    return record.parent / "out", result, seconds


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """`make demo` once per session, through the real `tune run`: (output_dir, result, seconds)."""
    return _shared_run(tmp_path_factory, "demo")


@pytest.fixture(scope="session")
def chat_demo(tmp_path_factory):
    """`make demo-chat` once per session, through the real `tune run`: (output_dir, result, seconds)."""
    return _shared_run(tmp_path_factory, "chat_demo")


@pytest.fixture(scope="session")
def tools_demo(tmp_path_factory):
    """`make demo-tools` once per session, through the real `tune run`: (output_dir, result, seconds)."""
    return _shared_run(tmp_path_factory, "tools_demo")


def assistant_spans(ids: list[int], header: list[int], eot: int) -> list[bool]:
    """The trained mask a chat sample should have, read off its ids alone: after each assistant header, up to and
    including the next end-of-turn token."""
    trained, i = [False] * len(ids), 0
    while i < len(ids):
        if ids[i : i + len(header)] == header:
            i += len(header)
            while ids[i] != eot:
                trained[i] = True
                i += 1
            trained[i] = True
        i += 1
    return trained
