"""Issue O: lora_tools.push uploads the chat demo's checkpoint (adapter and model card, merged model, GGUF files) to
a Hub served on localhost by tests/fake_hub.py, through the real huggingface_hub client; each failure is one line.

push runs in this process, from a temporary folder (so that no .env of the checkout is read), with the chat
config's paths made absolute."""

import hashlib
import shutil
import socket

import pytest
from conftest import REPO, TINY
from fake_hub import FakeHub
from huggingface_hub import constants

from lora_tools import push
from lora_tools.export import __main__ as export

CONFIG = str(REPO / "configs" / "tiny_chat.yaml")
STEP = "step_0000120"


def overrides(out) -> list[str]:
    return [
        f"output_dir={out}",
        f"checkpointer.checkpoint_dir={TINY}",
        f"tokenizer.path={TINY}/original/tokenizer.model",
        f"tokenizer.special_tokens_path={TINY}/special_tokens.json",
        f"dataset.source={TINY}/data/chat_train.jsonl",
        f"val_dataset.source={TINY}/data/chat_heldout.jsonl",
    ]


@pytest.fixture
def run(chat_demo, tmp_path, monkeypatch, capsys):
    """A copy of the chat demo's last checkpoint with its LoRA GGUF, and ``push(*args, **env)`` -> (status,
    stdout, stderr) from a folder with no .env."""
    source, _, _ = chat_demo
    out = tmp_path / "out"
    shutil.copytree(source / "checkpoints" / STEP, out / "checkpoints" / STEP, ignore=shutil.ignore_patterns("gguf*"))
    (out / "checkpoints" / "latest").write_text(STEP + "\n")
    monkeypatch.chdir(tmp_path)
    assert export.main(["--config", CONFIG, *overrides(out), "--gguf-adapter"]) == 0

    def call(*args, out=out, **env):
        for key in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        # huggingface_hub reads HF_HUB_OFFLINE once, at import, and this test process runs offline (make test)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", env.get("HF_HUB_OFFLINE") == "1")
        capsys.readouterr()
        status = push.main(["--config", CONFIG, *overrides(out), *args])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return out, call


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_push_uploads_the_checkpoint_intact(run):
    from huggingface_hub import ModelCard, hf_hub_download

    out, call = run
    with FakeHub() as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_write"}
        status, stdout, stderr = call("--repo-id", "alice/tiny-chat", "--merged", "--gguf", "--private", **env)
        assert status == 0, stderr
        assert stdout.strip().endswith(f"pushed to {hub.url}/alice/tiny-chat")
        checkpoint = out / "checkpoints" / STEP
        local = {p.name: p for p in (checkpoint / "adapter").iterdir()}
        local |= {f"merged/{p.name}": p for p in (checkpoint / "model").iterdir()}
        local |= {f"gguf-adapter/{p.name}": p for p in (checkpoint / "gguf-adapter").iterdir()}
        pushed = hub.files("alice/tiny-chat")
        assert {k: sha(v) for k, v in pushed.items()} == {k: sha(p.read_bytes()) for k, p in local.items()}
        assert hub.repos["alice/tiny-chat"].private
        # the model card, read back through the client as the Hub's page would render it
        card = ModelCard.load(hf_hub_download("alice/tiny-chat", "README.md", endpoint=hub.url, token="hf_write"))
        assert card.data.library_name == "peft" and "lora" in card.data.tags
        assert card.data.base_model == str(TINY) and card.text.lstrip().startswith("# LoRA adapter for tiny")

        # a repository that holds files already is left alone unless --overwrite
        commits = len(hub.repos["alice/tiny-chat"].commits)
        status, _, stderr = call("--repo-id", "alice/tiny-chat", **env)
        assert status == 2 and "already holds" in stderr and "--overwrite" in stderr
        assert len(hub.repos["alice/tiny-chat"].commits) == commits
        (checkpoint / "adapter" / "README.md").write_text("# edited card\n")
        assert call("--repo-id", "alice/tiny-chat", "--overwrite", **env)[0] == 0
        assert hub.files("alice/tiny-chat")["README.md"] == b"# edited card\n"
        assert "merged/model.safetensors" in hub.files("alice/tiny-chat")  # kept


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAILURES = [  # (name, arguments, environment, words of the one error line)
    ("no token", ["--repo-id", "alice/x"], {}, "HF_TOKEN is not set"),
    ("read-only token", ["--repo-id", "alice/x"], {"HF_TOKEN": "hf_read"}, "HF_TOKEN is a read token"),
    ("revoked token", ["--repo-id", "alice/x"], {"HF_TOKEN": "hf_gone"}, "the Hub rejected HF_TOKEN"),
    ("no access", ["--repo-id", "bob/x"], {"HF_TOKEN": "hf_write"}, "HF_TOKEN may not write to bob/x"),
    ("invalid repo id", ["--repo-id", "alice/no spaces"], {"HF_TOKEN": "hf_write"}, "is not a Hub repository id"),
    ("offline", ["--repo-id", "alice/x"], {"HF_TOKEN": "hf_write", "HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ("no gguf", ["--repo-id", "alice/x", "--gguf"], {"HF_TOKEN": "hf_write"}, "has no GGUF files"),
    ("no merged model", ["--repo-id", "alice/x", "--merged"], {"HF_TOKEN": "hf_write"}, "has no merged model"),
    ("missing checkpoint", ["--repo-id", "alice/x"], {"HF_TOKEN": "hf_write"}, "no checkpoint under"),
    ("no network", ["--repo-id", "alice/x"], {"HF_TOKEN": "hf_write"}, "cannot reach the Hugging Face Hub"),
]


def test_push_failures_are_one_line(run, tmp_path):
    out, call = run
    for folder in ("gguf-adapter", "model"):
        shutil.rmtree(out / "checkpoints" / STEP / folder)
    with FakeHub() as hub:
        for name, args, env, words in FAILURES:
            env = {"HF_ENDPOINT": hub.url, **env}
            where = {"out": tmp_path / "empty"} if name == "missing checkpoint" else {}
            if name == "no network":
                env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
            status, stdout, stderr = call(*args, **where, **env)
            lines = stderr.strip().splitlines()
            assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, stderr)
            assert words in lines[0] and "Traceback" not in stderr, (name, lines[0])
            assert not any(token in stdout + stderr for token in ("hf_write", "hf_read", "hf_gone")), name
        assert hub.repos == {}  # nothing was created
