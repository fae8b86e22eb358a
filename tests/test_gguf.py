"""GGUF export checked by llama.cpp itself (llama-cpp-python): logits and greedy tokens against the merged
Hugging Face model in transformers, quantized files, the embedded chat template, and the held-out loss."""

import json
import math
import subprocess
import sys
from functools import cache

import llama_cpp  # make test installs it (requirements-gguf.txt)
import numpy as np
import pytest
from conftest import HF_PYTHON, REPO, TINY, logged_metrics, offline_env
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from lora_tools.config.loader import load_config
from lora_tools.data.chat_template import LLAMA3_TEMPLATE, read_template
from lora_tools.data.sft import conversation_dataset
from lora_tools.eval.inference import PromptFormat
from lora_tools.export import __main__ as export

CHAT_CONFIG = "configs/tiny_chat.yaml"
N_NEW = 32
# Next-token logit differences, relative to the logits' scale. f16 rounds each weight by at most 2^-11 of itself;
# to first order each matrix product a value passes through adds about that much relative error: 5 per layer
# (q/k/v, output, the MLP's two stages) over the tiny model's 4 layers, and its head, 21 in all.
STAGES = 5 * 4 + 1
F16_BOUND = STAGES * 2**-11
# q8_0 stores blocks of 32 weights as 8-bit integers times an f16 scale: each weight rounded by at most half a step,
# 1/254 of its block's largest weight, plus the scale's 2^-11.
Q8_BOUND = STAGES * (1 / 254 + 2**-11)
HELDOUT = [json.loads(line)["messages"] for line in (TINY / "data/chat_heldout.jsonl").read_text().splitlines()]


@cache
def _prompts() -> list[list[int]]:
    """10 held-out conversations up to their last assistant turn, as the recipe formats prompts."""
    from torchtune import config

    cfg = load_config(["--config", CHAT_CONFIG])
    fmt = PromptFormat(cfg, config.instantiate(cfg.tokenizer))
    out = []
    for messages in HELDOUT[:10]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        out.append(fmt.tokens(messages[:last]))
    return out


@pytest.fixture(scope="module")
def exported(chat_demo):
    out, _, _ = chat_demo
    args = ["--config", CHAT_CONFIG, f"output_dir={out}", "--gguf", "--quant", "f16,q8_0,q4_k_m"]
    assert export.main(args) == 0
    folder = out / "checkpoints" / "step_0000120" / "gguf"
    return out, folder


@pytest.fixture(scope="module")
def hf(exported, tmp_path_factory):
    """transformers on the merged model: next-token logits and 32 greedy tokens for each prompt."""
    out, _ = exported
    tmp = tmp_path_factory.mktemp("hf_gguf")
    (tmp / "prompts.json").write_text(json.dumps(_prompts()))
    merged = out / "checkpoints" / "step_0000120" / "model"
    cmd = [str(HF_PYTHON), str(REPO / "tests/hf_generate.py"), str(merged), str(tmp / "prompts.json"), str(N_NEW)]
    subprocess.run([*cmd, str(tmp / "out.json")], check=True, timeout=300)
    return json.loads((tmp / "out.json").read_text())


def _load(path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, seed=0)


def _next_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[len(tokens) - 1], dtype=np.float64)


def _greedy(llm, tokens: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(tokens)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference in units of the logit scale (the largest |logit| of the reference)."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_files_written(exported):
    _, folder = exported
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["Modelfile", "README.md", "model-f16.gguf", "model-q4_k_m.gguf", "model-q8_0.gguf"]
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q4_k_m.gguf\n") and 'PARAMETER stop "<|eot_id|>"' in modelfile
    assert (
        "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul"
        in modelfile
    )
    assert "ollama create" in (folder / "README.md").read_text()


def test_modelfile_renders_the_training_prompts(exported):
    """The Modelfile's template, evaluated as Ollama would for 20 held-out conversations (its few Go template
    constructs, in lora_tools.gguf_export.ollama_render), is the training prompt without the BOS Ollama adds."""
    from torchtune import config

    from lora_tools.data.chat_template import ChatFormat
    from lora_tools.export.gguf_export import ollama_render

    _, folder = exported
    template = (folder / "Modelfile").read_text().split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    cfg = load_config(["--config", CHAT_CONFIG])
    fmt = ChatFormat(config.instantiate(cfg.tokenizer), str(TINY))
    for messages in HELDOUT[:20]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        expected = fmt.render(messages[:last], add_generation_prompt=True).removeprefix("<|begin_of_text|>")
        assert ollama_render(template, messages[:last]) == expected


def test_embedded_template_keeps_the_training_date(exported):
    """llama-server passes today's date to Llama 3 templates; the date set inside the GGUF's template wins."""
    from lora_tools.data.chat_template import render_template

    _, folder = exported
    template = _load(folder / "model-f16.gguf").metadata["tokenizer.chat_template"]
    messages = [{"role": "user", "content": "Hi"}]
    text = render_template(template, messages, True, {"bos_token": "<|begin_of_text|>", "date_string": "01 Jan 2030"})
    assert "Today Date: 26 Jul 2024\n" in text and "2030" not in text


def test_f16_logits_and_greedy_tokens_match_transformers(exported, hf):
    _, folder = exported
    llm = _load(folder / "model-f16.gguf")
    worst = 0.0
    for tokens, logits, greedy in zip(_prompts(), hf["logits"], hf["greedy"], strict=True):
        worst = max(worst, _relative(_next_logits(llm, tokens), np.array(logits)))
        assert _greedy(llm, tokens, N_NEW) == greedy
    assert worst <= F16_BOUND, worst
    print(f"\nf16 vs transformers: largest next-token logit difference {worst:.2e} of the logit scale")


def test_quantized_files(exported):
    _, folder = exported
    f16 = _load(folder / "model-f16.gguf")
    reference = [_next_logits(f16, t) for t in _prompts()]
    diffs = {}
    for quant in ("q8_0", "q4_k_m"):
        llm = _load(folder / f"model-{quant}.gguf")
        diffs[quant] = max(_relative(_next_logits(llm, t), r) for t, r in zip(_prompts(), reference, strict=True))
        assert len(_greedy(llm, _prompts()[0], 8)) == 8
    assert diffs["q8_0"] <= Q8_BOUND, diffs
    print(f"\nlogit difference vs f16, of the logit scale: q8_0 {diffs['q8_0']:.2e}, q4_k_m {diffs['q4_k_m']:.2e}")


def test_lora_gguf_on_the_base_gguf_matches_the_merged_gguf(exported):
    """--gguf-adapter: llama.cpp with the base f16 GGUF and the LoRA GGUF gives the merged f16 GGUF's next-token
    logits, within 1e-2 of the logit scale (each side rounds to f16 differently: W + BA once, or W, B and A
    apart; F16_BOUND, about 1.03e-2, bounds either), and its 32 greedy tokens, for 10 held-out prompts."""
    out, folder = exported
    args = ["--config", CHAT_CONFIG, f"output_dir={out}", "--gguf-adapter"]
    assert export.main(args) == 0
    lora_dir, base = out / "checkpoints" / "step_0000120" / "gguf-adapter", out / "base-gguf" / "model-f16.gguf"
    exported_at = base.stat().st_mtime_ns
    assert export.main(args) == 0 and base.stat().st_mtime_ns == exported_at  # the base GGUF is reused
    modelfile = (lora_dir / "Modelfile").read_text().splitlines()
    paths = {line.split(" ", 1)[0]: (lora_dir / line.split(" ", 1)[1]).resolve() for line in modelfile[:2]}
    assert paths == {"FROM": base.resolve(), "ADAPTER": (lora_dir / "adapter-f16.gguf").resolve()}
    assert all(p.is_file() for p in paths.values())

    with_lora = llama_cpp.Llama(
        model_path=str(base), lora_path=str(paths["ADAPTER"]), n_ctx=512, logits_all=True, verbose=False, seed=0
    )
    merged, plain = _load(folder / "model-f16.gguf"), _load(base)
    worst, base_worst = 0.0, 0.0
    for tokens in _prompts():
        reference = _next_logits(merged, tokens)
        worst = max(worst, _relative(_next_logits(with_lora, tokens), reference))
        base_worst = max(base_worst, _relative(_next_logits(plain, tokens), reference))
        assert _greedy(with_lora, tokens, N_NEW) == _greedy(merged, tokens, N_NEW)
    assert worst <= 1e-2 and base_worst > 0.1, (worst, base_worst)
    print(f"\nbase + LoRA GGUF vs merged GGUF: {worst:.2e} of the logit scale (the base alone: {base_worst:.2f})")


def test_llama_cpp_chat_formatting_gives_the_trained_tokens(exported):
    """llama-cpp-python formats a conversation with the GGUF's embedded template, and tokenizes it with
    llama.cpp's tokenizer: the same ids as the recipe's prompt for that conversation."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    _, folder = exported
    llm = _load(folder / "model-f16.gguf")
    template = llm.metadata["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(template=template, eos_token="<|eot_id|>", bos_token="<|begin_of_text|>")
    for messages, expected in zip(HELDOUT[:10], _prompts(), strict=True):
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = formatter(messages=messages[:last]).prompt
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == expected


def test_llama_cpp_formats_tool_conversations_as_training_did(exported):
    """The GGUF's embedded template is Llama 3.2's own: llama-cpp-python formats the tool demo's held-out
    conversations with it and the schemas (tools=), llama.cpp's tokenizer cuts them, and the ids are the ones the
    recipe trains on for those rows (call JSON, ipython results, and the schemas in the first user message)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from torchtune import config

    from lora_tools.data import records

    _, folder = exported
    llm = _load(folder / "model-f16.gguf")
    template = llm.metadata["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(
        template=template, eos_token="<|eot_id|>", bos_token="<|begin_of_text|>", add_generation_prompt=False
    )
    cfg = load_config(["--config", CHAT_CONFIG])
    source, tools = str(TINY / "data/tools_heldout.jsonl"), str(TINY / "data/tools.json")
    trained = conversation_dataset(config.instantiate(cfg.tokenizer), source, chat_template=str(TINY), tools=tools)
    rows = [json.loads(line) for line in (TINY / "data/tools_heldout.jsonl").read_text().splitlines()]
    schemas = json.loads((TINY / "data/tools.json").read_text())
    for i, row in enumerate(rows[:10]):
        messages = records.conversation("row", row, "messages", "dataset")
        prompt = formatter(messages=messages, tools=schemas).prompt
        assert "<|start_header_id|>ipython<|end_header_id|>" in prompt and '"parameters": {"thing": ' in prompt
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == trained[i]["tokens"], i


def test_llama_cpp_held_out_loss_equals_the_recipes(exported):
    """The mean loss of llama.cpp's logits on the demo's held-out assistant tokens is within 1% of the recipe's
    own held-out loss after training."""
    out, folder = exported
    steps = logged_metrics(out)
    recipe_loss = steps[max(s for s, m in steps.items() if "val_loss" in m)]["val_loss"]
    from torchtune import config

    cfg = load_config(["--config", CHAT_CONFIG])
    ds = conversation_dataset(
        config.instantiate(cfg.tokenizer), str(TINY / "data/chat_heldout.jsonl"), chat_template=str(TINY)
    )
    llm = _load(folder / "model-f16.gguf")
    total, count = 0.0, 0
    for i in range(len(ds)):
        tokens, labels = ds[i]["tokens"], ds[i]["labels"]
        llm.reset()
        llm.eval(tokens)
        scores = np.array(llm.scores[: len(tokens)], dtype=np.float64)
        logp = (
            scores
            - np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - scores.max(-1, keepdims=True)
        )
        for pos in range(len(tokens) - 1):
            if labels[pos + 1] != CROSS_ENTROPY_IGNORE_IDX:
                total -= logp[pos, labels[pos + 1]]
                count += 1
    loss = total / count
    assert math.isfinite(loss) and abs(loss - recipe_loss) <= 0.01 * recipe_loss, (loss, recipe_loss)
    print(f"\nheld-out loss: llama.cpp {loss:.4f}, recipe {recipe_loss:.4f}")


def _one_line_error(capsys, status):
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err
    return lines[0]


def test_bad_exports_are_one_line_and_leave_no_gguf(exported, tmp_path, capsys):
    out, folder = exported
    before = sorted(p.name for p in folder.iterdir())
    status = export.main(["--config", CHAT_CONFIG, f"output_dir={out}", "--gguf", "--quant", "q4_km"])
    line = _one_line_error(capsys, status)
    assert "'q4_km' is not a quantization type" in line and "q4_k_m" in line
    status = export.main(["--config", CHAT_CONFIG, f"output_dir={tmp_path}/none", "--gguf"])
    assert "no checkpoint under" in _one_line_error(capsys, status)
    step = out / "checkpoints" / "step_0000100"  # a step checkpoint: adapter and resume state only
    status = export.main(["--config", CHAT_CONFIG, f"output_dir={out}", "--checkpoint", str(step), "--gguf"])
    line = _one_line_error(capsys, status)
    assert "has no merged model (saved adapter-only)" in line and f"--checkpoint {step}" in line
    assert not (step / "gguf").exists()
    assert sorted(p.name for p in folder.iterdir()) == before
    # any checkpoint exports once its merged model is written
    assert export.main(["--config", CHAT_CONFIG, f"output_dir={out}", "--checkpoint", str(step)]) == 0
    assert export.main(["--config", CHAT_CONFIG, f"output_dir={out}", "--checkpoint", str(step), "--gguf"]) == 0
    assert (step / "gguf" / "model-f16.gguf").is_file()


def test_base_model_export_matches_transformers(tmp_path):
    """--base: the base model's GGUF, next-token logits as transformers computes them on the base folder."""
    out = tmp_path / "out"
    assert export.main(["--config", CHAT_CONFIG, f"output_dir={out}", "--gguf", "--base"]) == 0
    prompts = _prompts()[:3]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    cmd = [str(HF_PYTHON), str(REPO / "tests/hf_generate.py"), str(TINY), str(tmp_path / "prompts.json"), "1"]
    subprocess.run([*cmd, str(tmp_path / "hf.json")], check=True, timeout=300)
    expected = json.loads((tmp_path / "hf.json").read_text())["logits"]
    llm = _load(out / "base-gguf" / "model-f16.gguf")
    assert llm.metadata["tokenizer.chat_template"] == read_template(str(TINY))[0]  # the model's own, as it is
    worst = max(_relative(_next_logits(llm, t), np.array(e)) for t, e in zip(prompts, expected, strict=True))
    assert worst <= F16_BOUND, worst


def test_torchtune_builders_get_the_llama3_format_and_a_warning(caplog):
    cfg = load_config(["--config", "configs/tiny.yaml"])  # torchtune's alpaca_dataset
    assert export.training_template(cfg, base=False) == LLAMA3_TEMPLATE
    assert "alpaca_dataset trains in torchtune's Llama 3 format" in caplog.text


def test_export_checks_the_disk_first(tmp_path):
    """A 4 MiB disk (a tmpfs in a private mount namespace) for a 6.7 MB f16 file: refused before writing."""
    small = tmp_path / "small"
    small.mkdir()
    cmd = (
        f"mount -t tmpfs -o size=4M tmpfs {small} && cd {REPO} && {sys.executable} -m lora_tools.export "
        f"--config {CHAT_CONFIG} output_dir={small}/out --gguf --base; status=$?; find {small} -type f; exit $status"
    )
    result = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, env=offline_env())
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "not enough disk for the GGUF files" in errors[0] and "GB free" in errors[0]
    assert result.stdout.strip() == ""  # no file written


def test_a_failed_export_leaves_no_partial_file(exported, tmp_path):
    """A failure after the f16 file's header is written (here: a config whose head count does not divide the q
    rows) removes the partial file; the folder holds nothing."""
    import shutil

    from lora_tools.export import gguf_export

    out, _ = exported
    model = tmp_path / "model"
    shutil.copytree(out / "checkpoints" / "step_0000120" / "model", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_attention_heads": 7}))
    with pytest.raises(RuntimeError):
        gguf_export.export(model, tmp_path / "gguf", ["f16", "q8_0"], "broken", None)
    assert list((tmp_path / "gguf").iterdir()) == []
