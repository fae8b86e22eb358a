"""Scores before and after: lora_tools.evaluate, eval_tasks at the end of training, the plot and the model card.

The demo run (`make demo`: configs/tiny.yaml with eval_tasks) is shared with test_recipe_runs through the
session fixture; the harness check runs lm-evaluation-harness's own Hugging Face model in .venv-hf.
"""

import json
import math
import re
import shutil
import subprocess
import time

import pytest
from conftest import (
    DEMO_EVAL,
    DEMO_STEP_DIR,
    DEMO_STEPS,
    HF_PYTHON,
    REPO,
    TINY,
    assert_scores_as_documented,
    logged_metrics,
    tune_run,
)
from huggingface_hub import ModelCard
from omegaconf import OmegaConf
from PIL import Image
from wandb_records import run_id, summary

from lora_tools import evaluate
from lora_tools.checkpoints import latest_checkpoint
from lora_tools.eval import harness

STEP = DEMO_STEP_DIR


def _eval_json(checkpoint):
    return json.loads((checkpoint / "eval.json").read_text())


def _table(text: str, header: str) -> list[list[str]]:
    """The rows of the markdown table under ``## header`` in ``text``."""
    section = text.split(f"## {header}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_demo_prints_scores_and_writes_plot_and_card(demo):
    assert f'"{DEMO_EVAL}"' in (REPO / "Makefile").read_text()  # the fixture runs what `make demo` runs
    out, result, seconds = demo
    checkpoint = out / "checkpoints" / STEP
    report = _eval_json(checkpoint)
    rows = {(r["task"], r["metric"]): r for r in report["rows"]}
    assert set(rows) == {("tiny_qa", "acc"), ("tiny_qa_gen", "exact_match")}
    # printed next to the loss table, numbers as in eval.json
    for r in report["rows"]:
        line = next(x for x in result.stdout.splitlines() if x.startswith(r["task"] + " "))
        assert f"{r['base']:.4f}" in line and f"{r['finetuned']:.4f}" in line, line
    # what the demo teaches shows in its scores: free answers to held-out questions exactly right after, not
    # before; the right option above the base's pick by more than 3 standard errors of the difference
    em, mc = rows["tiny_qa_gen", "exact_match"], rows["tiny_qa", "acc"]
    assert em["base"] <= 0.10 and em["finetuned"] >= 0.80, em
    assert mc["difference"] > 3 * math.hypot(mc["stderr_base"], mc["stderr_finetuned"]), mc
    # the sample prompts are held-out wordings, and the last samples printed answer them right
    train = {e["instruction"] for e in json.loads((TINY / "data/train.json").read_text())}
    heldout = {e["instruction"]: e["output"] for e in json.loads((TINY / "data/heldout.json").read_text())}
    prompts = list(OmegaConf.load(REPO / "configs" / "tiny.yaml").sample_prompts)
    assert prompts and all(p in heldout and p not in train for p in prompts), prompts
    log = result.stdout + result.stderr
    for prompt in prompts:
        assert f"sample at step {DEMO_STEPS} | {prompt!r} -> {heldout[prompt]!r}" in log, prompt
    shown = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("sample at step")]
    assert len(shown) == len(prompts) and all(line in log for line in shown), shown
    # the README shows these lines as the demo printed them (on another CPU, within 2 of the 30 answers)
    readme = (REPO / "README.md").read_text()
    for task in ("tiny_qa", "tiny_qa_gen"):
        assert_scores_as_documented(result.stdout, readme, task, len(heldout))
    # base and finetuned scored with the same harness settings
    base, finetuned = report["base"], report["finetuned"]
    assert base["config"] == finetuned["config"] and base["n-shot"] == finetuned["n-shot"]
    assert base["n-samples"] == finetuned["n-samples"]
    assert base["n-samples"]["tiny_qa"]["effective"] == len(heldout)
    assert report["settings"]["prompt_format"] == "llama3+alpaca" and report["settings"]["tasks"] == [
        "tiny_qa",
        "tiny_qa_gen",
    ]

    # the plot next to the logs and in the adapter folder
    for png in (out / "logs" / "training_curves.png", checkpoint / "adapter" / "training_curves.png"):
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] >= 600
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20  # curves, not a blank canvas

    # the model card: metadata the Hub reads, tables equal to the run's numbers
    text = (checkpoint / "adapter" / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.base_model == str((REPO / "assets" / "tiny").resolve())
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    val = {s: m["val_loss"] for s, m in logged_metrics(out).items() if "val_loss" in m}
    loss_rows = _table(text, "Held-out loss")
    assert loss_rows == [
        ["before", f"{val[0]:.4f}", f"{math.exp(val[0]):.2f}"],
        ["after", f"{val[DEMO_STEPS]:.4f}", f"{math.exp(val[DEMO_STEPS]):.2f}"],
    ]
    eval_rows = _table(text, "Evaluation")
    assert [row[:2] for row in eval_rows] == [[r["task"], r["metric"]] for r in report["rows"]]
    for row, r in zip(eval_rows, report["rows"], strict=True):
        assert row[2].startswith(f"{r['base']:.4f}") and row[3].startswith(f"{r['finetuned']:.4f}")
        assert row[4] == f"{r['difference']:+.4f}"
    assert "![training curves](training_curves.png)" in text
    print(f"make demo with eval_tasks: {seconds:.1f} s; rows: {report['rows']}")


def test_evaluate_equals_the_harness_on_the_merged_model(demo, tmp_path):
    """lora_tools.evaluate (torchtune model + adapter) and lm-eval's own `hf` model on the merged weights agree."""
    out, _, _ = demo
    checkpoint = tmp_path / STEP
    shutil.copytree(out / "checkpoints" / STEP, checkpoint)
    (checkpoint / "eval.json").unlink()
    start = time.monotonic()
    status = evaluate.main(
        ["--config", "configs/tiny.yaml", "--checkpoint", str(checkpoint), "--tasks", "tiny_qa", "--format", "plain"]
    )
    seconds = time.monotonic() - start
    assert status == 0
    ours = _eval_json(checkpoint)["finetuned"]["results"]["tiny_qa"]

    command = [HF_PYTHON, REPO / "tests" / "hf_lm_eval.py", "--model", checkpoint / "model", "--tasks", "tiny_qa"]
    command += ["--include-path", REPO / "evals" / "tiny_qa"]
    theirs = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    reference = json.loads(theirs.stdout)["results"]["tiny_qa"]
    assert ours["acc,none"] == reference["acc,none"]
    assert ours["acc_stderr,none"] == pytest.approx(reference["acc_stderr,none"], rel=1e-12)
    print(f"evaluate: {seconds:.1f} s; acc {ours['acc,none']} (harness on the merged model: {reference['acc,none']})")


def test_chat_prompts_are_the_training_format(demo):
    """In chat format the harness's prompt text is cut back into exactly the ids training used for a prompt."""
    from torchtune import config as tt_config

    from lora_tools.config.loader import load_config
    from lora_tools.eval.inference import PromptFormat, load_model

    out, _, _ = demo
    cfg = load_config(["--config", "configs/tiny.yaml", f"output_dir={out}"])
    tokenizer = tt_config.instantiate(cfg.tokenizer)
    prompts = PromptFormat(cfg, tokenizer)
    model, _ = load_model(cfg, None, merged=False)
    lm = harness.TorchtuneLM(model, tokenizer, prompts)
    # (special-token text typed inside a question is the one difference: torchtune's Llama 3 format keeps it as
    # text, the harness's text round trip makes it the token, as a Hugging Face tokenizer would)
    for question in ("What color is the lemon?", "Give the opposite of the word.\nhot", "Ünïcode: 你好 ≠ 👋"):
        messages = [{"role": "user", "content": question}]
        assert lm.tok_encode(lm.apply_chat_template(messages)) == prompts.tokens(messages)


def _fails(capsys, argv, *words):
    status = evaluate.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "Skipping import of cpp" not in line]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


def test_evaluate_bad_inputs(demo, tmp_path, capsys):
    out, _, _ = demo
    base = ["--config", "configs/tiny.yaml", f"output_dir={out}"]
    _fails(capsys, [*base, "--tasks", "tiny_q"], "unknown evaluation task 'tiny_q'", "did you mean tiny_qa")
    _fails(capsys, [*base, "--tasks", "tiny_qa", "--limit", "0"], "--limit", "at least 1")
    empty = tmp_path / "step_0000007"
    empty.mkdir()
    not_complete = "is not a complete checkpoint (no recipe_state.pt)"
    _fails(capsys, [*base, "--tasks", "tiny_qa", "--checkpoint", str(empty)], not_complete)
    adapter_only = tmp_path / "adapter_only"
    shutil.copytree(out / "checkpoints" / STEP, adapter_only, ignore=shutil.ignore_patterns("model", "eval.json"))
    _fails(
        capsys,
        [*base, "--tasks", "tiny_qa", "--checkpoint", str(adapter_only), "--merged"],
        "has no merged model (saved adapter-only)",
        "lora_tools.export",
    )
    _fails(
        capsys, ["--config", "configs/tiny.yaml", f"output_dir={tmp_path}/none", "--tasks", "tiny_qa"], "train first"
    )
    assert not (tmp_path / "adapter_only" / "eval.json").exists()


def test_hub_task_while_offline_is_one_line(demo, capsys):
    """A harness task whose dataset is on the Hub, with the Hub unreachable: say so, and what to do."""
    out, _, _ = demo
    _fails(
        capsys,
        ["--config", "configs/tiny.yaml", f"output_dir={out}", "--tasks", "arc_easy", "--limit", "2"],
        "allenai/ai2_arc",  # the dataset that is missing
        "needs network",
        "--include-path",
    )
    assert re.search(r"arc", capsys.readouterr().err) is None  # nothing printed after the error line


def test_scores_go_to_the_wandb_run_summary(tmp_path, monkeypatch):
    """eval_tasks with the W&B logger: the training run's summary holds the rows; the command adds to the same run."""
    out = tmp_path / "out"
    wandb = "metric_logger._component_=torchtune.training.metric_logging.WandBLogger"
    short = ["max_steps_per_epoch=4", "run_val_every_n_steps=null", "sample_every_n_steps=null"]
    run = tune_run(out, wandb, *short, "eval_tasks=[tiny_qa]", "eval_limit=20")
    assert run.returncode == 0, run.stderr_text[-3000:]
    (run_file,) = out.rglob("run-*.wandb")
    rows = _eval_json(latest_checkpoint(out))["rows"]
    logged = summary(run_file)
    for kind in ("base", "finetuned", "difference"):
        assert logged[f"eval/tiny_qa/acc/{kind}"] == pytest.approx(rows[0][kind], abs=1e-12), kind

    monkeypatch.setenv("WANDB_MODE", "offline")
    status = evaluate.main(["--config", "configs/tiny.yaml", f"output_dir={out}", wandb, "--tasks", "tiny_qa_gen"])
    assert status == 0
    files = sorted(out.rglob("run-*.wandb"), key=lambda p: p.stat().st_mtime)
    assert len(files) == 2 and run_id(files[-1]) == run_id(run_file)  # the training run, resumed
    assert "eval/tiny_qa_gen/exact_match/finetuned" in summary(files[-1])
    assert not (REPO / "wandb").exists()  # nothing written where the command was run
