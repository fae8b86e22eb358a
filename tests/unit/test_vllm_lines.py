"""lora_tools.export --vllm: which `vllm serve` lines a checkpoint gets (tests/test_vllm.py runs them)."""

import shlex

from omegaconf import OmegaConf

from lora_tools.export import vllm_serve


def lines(tmp_path, merged=True, **model):
    cfg = OmegaConf.load("configs/tiny_chat.yaml")
    cfg.output_dir = str(tmp_path / "my run")
    cfg.model.update(model)
    checkpoint = tmp_path / "step_0000010"
    (checkpoint / "model").mkdir(parents=True)
    if merged:
        (checkpoint / "model" / "model.safetensors").write_bytes(b"")
    return vllm_serve.serve_lines(cfg, "bf16", checkpoint, checkpoint / "adapter" / "chat_template.jinja")


def test_lora_gets_an_adapter_line_and_a_merged_line(tmp_path):
    (adapter, merged), notes = lines(tmp_path, lora_rank=12)
    argv = shlex.split(adapter)
    assert argv[:3] == ["vllm", "serve", "assets/tiny"] and not notes
    assert argv[argv.index("--lora-modules") + 1] == f"my-run={tmp_path}/step_0000010/adapter"
    assert argv[argv.index("--max-lora-rank") + 1] == "16"  # 12 rounded up to a rank vLLM accepts
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    assert shlex.split(merged)[2] == f"{tmp_path}/step_0000010/model"


def test_dora_and_qlora_get_the_merged_model_only(tmp_path):
    for model, word in (({"use_dora": True}, "DoRA"), ({"quantize_base": True}, "QLoRA")):
        commands, notes = lines(tmp_path / word, **model)
        assert [shlex.split(c)[2] for c in commands] == [f"{tmp_path / word}/step_0000010/model"]
        assert len(notes) == 1 and word in notes[0]


def test_no_merged_model_says_how_to_write_it(tmp_path):
    commands, notes = lines(tmp_path, merged=False)
    assert len(commands) == 1 and "--enable-lora" in commands[0]
    assert "python -m lora_tools.export" in notes[0]
