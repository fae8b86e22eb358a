"""Preference tuning (DPO, ORPO): the losses against TRL's on one batch, the tiny DPO demo moving, exact resume,
the outputs and the memory plan."""

import json
import signal
import subprocess

import pytest
import torch
from conftest import (
    HF_PYTHON,
    REPO,
    TINY,
    TUNE,
    final_adapter,
    hf_logits,
    latest_checkpoint,
    logged_metrics,
    losses,
    offline_env,
    pointer,
    recipe_logits,
    rounding,
    tune,
    wait_for,
)

from lora_tools.config import settings
from lora_tools.config.loader import load_config
from lora_tools.data import batching
from lora_tools.train import objectives

DPO_CONFIG = "configs/tiny_dpo.yaml"
CHAT_STEP = "step_0000120"  # the chat demo's last step: configs/tiny_dpo.yaml starts from its merged model


def recipe_on_the_base(tmp_path, *overrides):
    """The DPO demo config set up in this process on the tiny base model (no SFT run needed), held-out pairs."""
    from lora_finetune_single_device import LoRAFinetuneRecipe

    argv = [DPO_CONFIG, f"output_dir={tmp_path}", f"checkpointer.checkpoint_dir={TINY}", "val_dataset=null"]
    argv += ["sample_prompts=[]", "dataset.source=assets/tiny/data/pairs_heldout.jsonl", *overrides]
    cfg = load_config(["--config", *argv])
    recipe = LoRAFinetuneRecipe(cfg, settings.parse(cfg, "test config"))
    recipe.setup()
    return recipe


def trl_pairs(batch) -> list[dict]:
    """The batch's pairs as TRL's collator takes them: prompt ids, then each response's ids (its labels' span)."""
    tokens, labels, lengths = batch["tokens"], batch["labels"], batch["lengths"]
    b = len(tokens) // 2
    pairs = []
    for i in range(b):
        pair = {}
        for side, row in (("chosen", i), ("rejected", b + i)):
            first = int((labels[row] != -100).nonzero()[0])  # label at p is token p + 1: the response starts there
            prompt = tokens[row, : first + 1].tolist()
            assert pair.setdefault("prompt_ids", prompt) == prompt  # both sides share the prompt
            pair[f"{side}_ids"] = tokens[row, first + 1 : int(lengths[row])].tolist()
            # the response's tokens are exactly its labels, ending in <|eot_id|>
            assert pair[f"{side}_ids"] == labels[row][labels[row] != -100].tolist()
        pairs.append(pair)
    return pairs


def test_dpo_and_orpo_losses_and_metrics_equal_trls(tmp_path):
    """One batch of 4 held-out pairs on the tiny model with a random (non-zero) adapter, so the policy differs from
    the reference (the base). Ours in this process; TRL 1.16's DPOTrainer and ORPOTrainer in .venv-hf on the same
    weights (our saved PEFT adapter on the base) and the same token ids."""
    recipe = recipe_on_the_base(tmp_path / "run", "batch_size=4")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in recipe.adapter_params.values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    recipe.save_checkpoint()
    batch = next(iter(recipe._dataloader))
    pairs = trl_pairs(batch)
    assert all(p["chosen_ids"] != p["rejected_ids"] for p in pairs)

    def ours(objective) -> dict[str, float]:
        counts = objective.counts(batch)
        with torch.no_grad():
            _, sums = objective(recipe._parts, batch, counts)
        return objective.reduce(sums, counts)

    dpo = ours(objectives.DPO(beta=0.1))
    orpo = ours(objectives.ORPO(beta=0.1, nll_on_prompt=True))  # TRL's NLL counts the prompt too

    request = tmp_path / "pairs.json"
    request.write_text(json.dumps({"pairs": pairs, "beta": 0.1}))
    out = tmp_path / "trl.json"
    adapter = recipe.last_checkpoint / "adapter"
    command = [HF_PYTHON, REPO / "tests" / "hf_preference_loss.py", TINY, adapter, request, out]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    trl = json.loads(out.read_text())

    print({k: (dpo[k], trl["dpo"][k]) for k in dpo if k in trl["dpo"]})
    print({k: (orpo[k], trl["orpo"][k]) for k in orpo if k in trl["orpo"]})
    assert abs(dpo["rewards/margins"]) > 1e-3  # the adapter moved the policy away from the reference
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert dpo[key] == pytest.approx(trl["dpo"][key], abs=1e-5), key
    for key in ("logps/chosen", "logps/rejected"):
        assert dpo[key] == pytest.approx(trl["dpo"][key], rel=1e-5), key
    for key in ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected"):
        assert orpo[key] == pytest.approx(trl["orpo"][key], abs=1e-5), key


# --- the tiny DPO demo (make demo-dpo), from the chat demo's merged model --------------------------------------


@pytest.fixture(scope="module")
def dpo_demo(chat_demo, tmp_path_factory):
    """`make demo-dpo` on this session's chat demo: (output_dir, base model folder, result)."""
    chat_out, _, _ = chat_demo
    base = chat_out / "checkpoints" / CHAT_STEP / "model"
    out = tmp_path_factory.mktemp("dpo_demo") / "out"
    result = tune("run", "lora_finetune_single_device.py", "--config", DPO_CONFIG, f"output_dir={out}",
                  f"checkpointer.checkpoint_dir={base}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out, base, result


def test_the_dpo_demo_moves_the_held_out_preferences(dpo_demo):
    """Held-out pairs (wordings training never uses): the share whose chosen answer the model gives the higher
    log-probability goes from at most 60% to at least 90%, the mean log-prob margin rises, and the demo prints the
    before/after table and sample answers before and after."""
    out, _, result = dpo_demo
    metrics = logged_metrics(out)
    last = max(metrics)
    before, after = metrics[0], metrics[last]
    print(f"\nheld-out preference accuracy {before['eval/preference_accuracy']:.2f} -> "
          f"{after['eval/preference_accuracy']:.2f}, margin {before['eval/preference_margin']:+.2f} -> "
          f"{after['eval/preference_margin']:+.2f}")  # fmt: skip
    assert before["eval/preference_accuracy"] <= 0.6
    assert after["eval/preference_accuracy"] >= 0.9
    assert after["eval/preference_margin"] > before["eval/preference_margin"]
    assert before["eval/rewards/margins"] == 0 and after["eval/rewards/margins"] > 0  # the reference is the start
    assert after["eval/rewards/accuracies"] >= 0.9
    assert before["val_loss"] > after["val_loss"]
    for step in range(1, last + 1):  # TRL's names, every step
        assert {"loss", "train/rewards/chosen", "train/rewards/margins", "train/logps/rejected"} <= set(metrics[step])
    table = result.stdout[result.stdout.index("held-out preference pairs:") :].splitlines()
    assert table[1].startswith("when | chosen preferred | log-prob margin | rewards/accuracies")
    assert table[2].startswith(f"before | {100 * before['eval/preference_accuracy']:.1f}%")
    assert table[3].startswith(f"after | {100 * after['eval/preference_accuracy']:.1f}%")
    for step in (0, last):
        assert f"sample at step {step} | 'What color is the lemon?' ->" in result.stdout + result.stderr
    card = (latest_checkpoint(out) / "adapter" / "README.md").read_text()
    assert "## Held-out preference pairs" in card and "| before |" in card and "| DPO (" in card
    # docs/preference.md shows this run's table and samples: percentages as printed, numbers within 5%
    doc = (REPO / "docs/preference.md").read_text()
    shown = doc[doc.index("<!-- demo numbers") :].split("```")[1].strip().splitlines()
    for printed, documented in zip(table[2:4], shown[2:4], strict=True):
        ours, theirs = printed.split(" | "), documented.split(" | ")
        assert ours[:2] == theirs[:2] and ours[3] == theirs[3], (printed, documented)
        for x, y in zip(ours[2:], theirs[2:], strict=True):
            if not x.endswith("%"):
                assert float(x) == pytest.approx(float(y), rel=0.05, abs=1e-3), (printed, documented)
    samples = [line for line in shown if line.startswith("sample at step")]
    assert len(samples) == 4
    for line in samples:  # the form of each answer: the chosen one after training, the fragment before
        step, answer = int(line.split()[3]), line.split(" -> ")[1]
        printed = next(x for x in (result.stdout + result.stderr).splitlines() if x.startswith(line.split(" -> ")[0]))
        assert (
            printed.split(" -> ")[1].startswith("'The color of the")
            == (step == last)
            == answer.startswith("'The color of the")
        ), (printed, line)


def test_the_dpo_adapter_and_merged_model_load_in_transformers_and_agree(dpo_demo, tmp_path):
    """The plain Hugging Face calls: PEFT's adapter on the run's base (the chat demo's merged model), and the
    merged model, give the recipe's own logits."""
    out, base, _ = dpo_demo
    ckpt = latest_checkpoint(out)
    ours = recipe_logits(ckpt, tmp_path, **{"checkpointer.checkpoint_dir": base})
    hf = hf_logits(ckpt, tmp_path, base=base)
    tolerance = 1e-4 * ours.abs().max().item()
    assert (hf["peft"] - hf["merged"]).abs().max().item() <= tolerance
    assert (hf["peft"] - ours).abs().max().item() <= tolerance
    assert (hf["peft"] - hf["base"]).abs().max().item() > 100 * tolerance  # DPO moved the model


def test_the_dpo_run_exports_a_gguf_that_llama_cpp_runs_as_transformers_does(dpo_demo, tmp_path):
    """GGUF export of the preference run's last checkpoint (f16): llama.cpp's next-token logits on held-out
    prompts equal transformers' on the merged model within the f16 bound of tests/test_gguf.py."""
    import llama_cpp
    import numpy as np
    from test_gguf import F16_BOUND

    from lora_tools.export import __main__ as export

    out, base, _ = dpo_demo
    args = ["--config", DPO_CONFIG, f"output_dir={out}", f"checkpointer.checkpoint_dir={base}", "--gguf"]
    assert export.main([*args, "--quant", "f16"]) == 0
    ckpt = latest_checkpoint(out)
    prompts = [[row["prompt"]] for row in map(json.loads, (TINY / "data/pairs_heldout.jsonl").read_text().splitlines())]
    from torchtune import config

    from lora_tools.eval.inference import PromptFormat

    cfg = load_config(["--config", DPO_CONFIG, f"checkpointer.checkpoint_dir={base}"])
    fmt = PromptFormat(cfg, config.instantiate(cfg.tokenizer))
    tokens = [fmt.tokens([{"role": "user", "content": p[0]}]) for p in prompts[:5]]
    (tmp_path / "prompts.json").write_text(json.dumps(tokens))
    cmd = [
        HF_PYTHON,
        REPO / "tests/hf_generate.py",
        ckpt / "model",
        tmp_path / "prompts.json",
        "1",
        tmp_path / "o.json",
    ]
    subprocess.run(cmd, check=True, timeout=300)
    hf = json.loads((tmp_path / "o.json").read_text())
    llm = llama_cpp.Llama(model_path=str(ckpt / "gguf" / "model-f16.gguf"), n_ctx=512, logits_all=True, verbose=False)
    worst = 0.0
    for ids, logits in zip(tokens, hf["logits"], strict=True):
        llm.reset()
        llm.eval(ids)
        ours = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
        worst = max(worst, float(np.abs(ours - np.array(logits)).max() / np.abs(np.array(logits)).max()))
    assert worst <= F16_BOUND, worst


def test_dpo_from_the_sft_adapter_uses_base_plus_that_adapter_as_its_reference(chat_demo, tmp_path):
    """Way 2 of docs/preference.md: the SFT run's adapter as the starting adapter on the original base. The run
    starts from that adapter exactly, and its precomputed reference log-probs are those of way 1 (the SFT run's
    merged model as the base), not the bare base's."""
    from torchtune.modules.peft import disable_adapter

    from lora_tools.checkpoints import load_recipe_state
    from lora_tools.train import reference

    chat_out, _, _ = chat_demo
    sft = chat_out / "checkpoints" / CHAT_STEP
    on = ["objective.precompute_reference=True"]
    started = recipe_on_the_base(tmp_path / "way2", *on, f"start_adapter={sft}")
    sft_adapter = load_recipe_state(sft)["adapter"]
    for key, value in sft_adapter.items():
        assert torch.equal(started._model.state_dict()[key], value), key
    ref_way2 = started._built["dataset"].dataset.reference
    built, c = started._built["dataset"], started.cfg
    collate = batching.collate_for(built, c.collate_fn, started._tokenizer.pad_id, built.ignore_index)
    with disable_adapter(started._model):
        bare = reference.precompute(started._objective, started._parts, built, 8, collate, started._strategy, "cpu")
    merged = recipe_on_the_base(tmp_path / "way1", *on, f"checkpointer.checkpoint_dir={sft / 'model'}")
    ref_way1 = merged._built["dataset"].dataset.reference
    # The two ways add the same terms in other orders (W + s·BA merged once, against W·x + s·B(A·x)): each summed
    # log-prob is off by at most rounding(n) of its magnitude, n the longest float32 sum on the way (the tiny
    # model's 768-wide MLP and 1684-token softmax: under 2**11).
    bound = rounding(2**11) * ref_way1.abs().max().item()
    worst, moved = (ref_way2 - ref_way1).abs().max().item(), (bare - ref_way1).abs().max().item()
    print(f"reference log-probs: way 2 - way 1 {worst:.3g}, bare base - way 1 {moved:.3g}, bound {bound:.3g}")
    assert worst <= bound
    assert moved > 100 * bound  # the SFT adapter moved them


# --- exact resume ------------------------------------------------------------------------------------------------


def test_a_dpo_run_killed_and_resumed_ends_with_the_same_adapter(tmp_path):
    """DPO on the tiny base with the reference precomputed (kept in each checkpoint): killed with SIGKILL once its
    first checkpoint is written (every 2 steps) and resumed, it logs the same losses and ends with the same adapter
    as a run left alone, exactly (one process, the same kernels in the same order), as the SFT resume test asserts."""
    common = ["--config", DPO_CONFIG, f"checkpointer.checkpoint_dir={TINY}", "val_dataset=null", "sample_prompts=[]"]
    common += ["dataset.source=assets/tiny/data/pairs_heldout.jsonl", "batch_size=2", "max_steps_per_epoch=10"]
    common += ["save_every_n_steps=2", "objective.precompute_reference=True"]
    full_out, cut_out = tmp_path / "full", tmp_path / "cut"
    full = tune(
        "run", "lora_finetune_single_device.py", *common, f"output_dir={full_out}", "metric_logger.filename=a.txt"
    )
    assert full.returncode == 0, full.stderr[-3000:]
    assert "Reference log-probs of 30 pairs computed" in full.stdout + full.stderr
    expected = losses(full_out, "a.txt")
    assert sorted(expected) == list(range(1, 11))

    command = [TUNE, "run", "lora_finetune_single_device.py", *common, f"output_dir={cut_out}"]
    proc = subprocess.Popen(command, cwd=REPO, env=offline_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: pointer(cut_out) is not None, proc=proc)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(pointer(cut_out).removeprefix("step_"))
    assert killed_at < 10

    again = [*common, f"output_dir={cut_out}", "resume_from_checkpoint=True", "metric_logger.filename=b.txt"]
    resumed = tune("run", "lora_finetune_single_device.py", *again)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Reference log-probs" not in resumed.stdout + resumed.stderr  # taken from the checkpoint
    after = losses(cut_out, "b.txt")
    assert sorted(after) == list(range(killed_at + 1, 11))
    assert after == {step: expected[step] for step in after}
    want, got = final_adapter(full_out), final_adapter(cut_out)
    assert want.keys() == got.keys() and all(torch.equal(want[name], got[name]) for name in want)


# --- the memory plan -----------------------------------------------------------------------------------------------


def test_the_dpo_plan_predicts_the_profilers_peak_of_a_real_run(tmp_path):
    """As tests/test_memory_plan.py checks SFT: two DPO optimizer steps of the real recipe on the tiny model
    (two rows per pair, and the reference forward with the adapters off, without gradients), every CPU allocation
    and free recorded by torch.profiler; the plan's predicted peak is within 10% of the largest live total."""
    from torch.profiler import ProfilerActivity, profile

    from lora_tools import memory

    class NoProfiler:
        def step(self):
            pass

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        recipe = recipe_on_the_base(tmp_path, "batch_size=8")
        batch = next(iter(recipe._dataloader))
        rows, width = batch["tokens"].shape
        trained = int((batch["labels"] != -100).sum())
        with torch.profiler.record_function("steps"):
            recipe.train_step([dict(batch)], NoProfiler())
            recipe.train_step([dict(batch)], NoProfiler())
    events = prof.profiler.kineto_results.events()
    steps = next(e for e in events if e.name() == "steps")
    live = measured = 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += e.nbytes()
        if steps.start_ns() <= e.start_ns() <= steps.end_ns():
            measured = max(measured, live)
    assert rows == 16  # 8 pairs
    predicted = memory.estimate(recipe.cfg, memory.Setting(8, 1, 0, False, False), width, trained / (rows * width)).peak
    print(f"tiny DPO: predicted {predicted / 2**20:.3f} MiB, profiler {measured / 2**20:.3f} MiB")
    assert measured > 10 * 2**20
    assert abs(predicted - measured) <= 0.10 * measured
