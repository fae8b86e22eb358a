"""Issue F: the FSDP2 recipe on 2 CPU processes (gloo) trains exactly as one device does, and resumes exactly
after one of its processes is killed."""

import json
import os
import shutil
import signal
import socket
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY,
    TORCHAO_NOTICE,
    final_adapter,
    latest_checkpoint,
    per_step,
    pointer,
    rounding,
    sgd_travel,
    tune_run,
    wait_for,
)

from lora_tools.demo.assets import THINGS

# 165 training samples (odd: the split across processes drops one, as one device's last partial batch does),
# a global batch of 8 as 2 micro-batches, 20 optimizer steps over 2 epochs, 29 held-out samples (odd: one
# process's share is padded) scored every 5 steps, sample answers generated before training and at the end.
# SGD with momentum, not AdamW: its update is linear in the gradient, so a rounding difference in the gradient
# moves the weights by that much (Adam divides by the gradient's own size, which turns a last-bit difference on a
# weight whose gradient is near zero into a whole step).
SGD = ["optimizer._component_=torch.optim.SGD", "optimizer.lr=0.1", "optimizer.momentum=0.9"]
MOMENTUM = 0.9
# The longest float32 sums in a step: over the 8 x 512 token positions of a global batch, plus the widths a value
# is summed over on its way through the tiny model's 4 layers (256, 768) and its head (1684 tokens), about 6,300.
SUM_LENGTH = 2**14
COMMON = [
    *SGD,
    "dataset.split=train[:165]",
    "val_dataset.split=train[:29]",
    "gradient_accumulation_steps=2",
    "epochs=2",
    "max_steps_per_epoch=10",
    "lr_scheduler.num_warmup_steps=4",
    "run_val_every_n_steps=5",
    "save_every_n_steps=4",
    "enable_activation_checkpointing=True",  # as the shipped multi-GPU config: wrapped layers, then sharded
]
ONE_DEVICE = ["batch_size=4"]  # 4 x 2 micro-batches = 8
TWO_PROCESSES = ["batch_size=2"]  # 2 x 2 micro-batches x 2 processes = 8


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same 20 steps on one device and on 2 processes, each run without interruption."""
    root = tmp_path_factory.mktemp("uninterrupted")
    single = tune_run(root / "single", *COMMON, *ONE_DEVICE, "metric_logger.filename=log.txt")
    assert single.returncode == 0, single.stderr_text[-3000:]
    # torchrun copies each process's stdout and stderr into files under ranks/ (--tee 3), for the logging test.
    tee = ("--log-dir", str(root / "ranks"), "--tee", "3")
    args = [*COMMON, *TWO_PROCESSES, "metric_logger.filename=log.txt"]
    multi = tune_run(root / "multi", *args, nproc=2, torchrun_args=tee)
    assert multi.returncode == 0, multi.stderr_text[-3000:]
    return root / "single", root / "multi", (single, multi)


def rank_lines(root: Path, rank: int) -> list[str]:
    """What one process printed (stdout, then stderr), as torchrun's --tee files hold it."""
    files = sorted(root.glob(f"ranks/*/attempt_0/{rank}/std*.log"), reverse=True)  # stdout.log, stderr.log
    assert [f.name for f in files] == ["stdout.log", "stderr.log"], files
    return [ln for f in files for ln in f.read_text().splitlines() if ln.strip() and TORCHAO_NOTICE not in ln]


def test_only_the_first_process_logs(uninterrupted):
    """torchtune's log_config sets the shared logger back to DEBUG where it runs: it runs on the first process only,
    so the second prints nothing (no config, no steps, no warnings); the first prints the config once."""
    root = uninterrupted[0].parent
    first, second = rank_lines(root, 0), rank_lines(root, 1)
    print(f"lines printed: process 0 {len(first)}, process 1 {len(second)}")
    assert second == [], second[:20]
    assert sum("Running LoRAFinetuneRecipe with resolved config" in ln for ln in first) == 1
    assert any("sample at step" in ln for ln in first) and any("held-out loss:" in ln for ln in first)


def sample_lines(run) -> list[str]:
    text = run.stdout_text + run.stderr_text
    return [line[line.index("sample at step") :] for line in text.splitlines() if "sample at step" in line]


def assert_same_training(single: Path, multi: Path, filename: str = "log.txt") -> None:
    """The same training, up to float32 rounding (see conftest.rounding): sums split across processes and batch
    shapes of another size add the same terms in another order, a relative difference of at most
    eps = rounding(SUM_LENGTH) in each gradient. Under SGD the weights then differ by at most eps times the distance
    the gradients could move them (sgd_travel), and a logged loss by eps times itself plus its gradient norm times
    that weight difference. Token counts are integers: equal."""
    eps = rounding(SUM_LENGTH)
    travel = sgd_travel(single, filename, MOMENTUM)
    grad_norm = per_step(single, filename, "grad_norm")
    assert per_step(multi, filename, "trained_tokens") == per_step(single, filename, "trained_tokens")
    assert sorted(per_step(multi, filename, "loss")) == list(range(1, max(travel) + 1))
    for key in ("loss", "val_loss"):
        want, got = per_step(single, filename, key), per_step(multi, filename, key)
        assert sorted(got) == sorted(want), key
        for step in want:
            # val_loss is scored on training samples (val_dataset is a slice of the training split): the training
            # gradient's norm stands in for its own.
            weights = grad_norm.get(max(step, 1), 0.0) * travel.get(step - (key == "loss"), 0.0)
            bound = eps * (abs(want[step]) + weights)
            assert abs(got[step] - want[step]) <= bound, (key, step, got[step] - want[step], bound)

    want, got = final_adapter(single), final_adapter(multi)
    assert want.keys() == got.keys()
    bound = eps * travel[max(travel)]
    worst = max((want[name] - got[name]).abs().max().item() for name in want)
    print(f"adapter difference {worst:.3g}, bound {bound:.3g}")
    assert worst <= bound, (worst, bound)
    assert max(got[n].abs().max().item() for n in got if "lora_b" in n) > 10 * bound  # the adapter did train


def test_two_processes_train_exactly_as_one_device(uninterrupted):
    single, multi, (single_run, multi_run) = uninterrupted
    assert_same_training(single, multi)
    # Greedy sample answers before training and at the end: generated by both processes together, printed once,
    # the same as one device's.
    assert len(sample_lines(multi_run)) == 4 and sample_lines(multi_run) == sample_lines(single_run)

    # Same outputs as one device: checkpoint layout, a single log (from the first process), the summary once.
    ckpt = latest_checkpoint(multi)
    assert ckpt.name == "step_0000020"
    layout = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*"))
    assert layout == sorted(str(p.relative_to(latest_checkpoint(single))) for p in latest_checkpoint(single).rglob("*"))
    logs = sorted(p.suffix for p in (multi / "logs").iterdir())
    assert logs == [".png", ".txt"]  # one metrics log and one plot, from the first process
    assert multi_run.stdout_text.count("held-out loss:") == 1


def test_one_process_under_torchrun_trains_exactly_as_one_device(uninterrupted, tmp_path):
    """FSDP2 with a single shard: checkpoints written mid-run must not touch the weights being trained."""
    single, _, _ = uninterrupted
    run = tune_run(tmp_path / "one", *COMMON, *ONE_DEVICE, "metric_logger.filename=log.txt", nproc=1)
    assert run.returncode == 0, run.stderr_text[-3000:]
    assert_same_training(single, tmp_path / "one")


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the torchrun worker with this RANK among the launcher's children."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in children:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


def test_resume_after_one_process_is_killed_ends_with_the_same_adapter(uninterrupted, tmp_path):
    _, multi, _ = uninterrupted
    out = tmp_path / "cut"
    proc = tune_run(out, *COMMON, *TWO_PROCESSES, "metric_logger.filename=log_first.txt", nproc=2, wait=False)
    wait_for(lambda: pointer(out) == "step_0000008", proc=proc)
    os.kill(_rank_pid(proc.pid, rank=1), signal.SIGKILL)
    proc.communicate(timeout=120)  # torchrun takes the whole job down; nothing hangs
    assert proc.returncode != 0

    resumed = tune_run(
        out, *COMMON, *TWO_PROCESSES, "resume_from_checkpoint=True", "metric_logger.filename=log_resumed.txt", nproc=2
    )
    assert resumed.returncode == 0, resumed.stderr_text[-3000:]
    first_resumed = min(per_step(out, "log_resumed.txt", "loss"))
    assert first_resumed > 8  # it went on from a checkpoint (step 8, or a later one written before the kill landed)
    want = per_step(multi, "log.txt", "loss")
    got = per_step(out, "log_resumed.txt", "loss")
    assert sorted(got) == list(range(first_resumed, 21))
    # The same processes and thread counts do the same operations in the same order: no tolerance.
    assert got == {step: want[step] for step in got}
    want, got = final_adapter(multi), final_adapter(out)
    assert want.keys() == got.keys() and all(torch.equal(want[name], got[name]) for name in want)


def test_two_machines_meeting_at_a_rendezvous_train_the_same(uninterrupted, tmp_path):
    """The README's several-machines command, with both "machines" on this one (1 process each)."""
    _, multi, _ = uninterrupted
    out = tmp_path / "nodes"
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rendezvous = ["--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "t"]
    args = [*COMMON, *TWO_PROCESSES, "metric_logger.filename=log.txt"]
    nodes = [tune_run(out, *args, nproc=1, torchrun_args=rendezvous, wait=False) for _ in range(2)]
    for node in nodes:
        node.communicate(timeout=600)
        assert node.returncode == 0
    # Each launcher sets its own thread count, so float sums are taken in another order.
    assert_same_training(multi, out)


def test_sigterm_to_the_launcher_saves_the_last_completed_step(tmp_path):
    out = tmp_path / "out"
    args = [*TWO_PROCESSES, "max_steps_per_epoch=null", "run_val_every_n_steps=null", "metric_logger.filename=log.txt"]
    proc = tune_run(out, *args, nproc=2, wait=False)
    log_file = out / "logs" / "log.txt"
    wait_for(lambda: log_file.is_file() and log_file.read_text().count("loss:") >= 3, proc=proc)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both processes
    proc.communicate(timeout=120)
    last_step = max(per_step(out, "log.txt", "loss"))
    assert last_step < 100  # stopped early (an epoch is 500 steps)
    assert pointer(out) == f"step_{last_step:07d}"


def test_a_single_device_checkpoint_is_not_resumed_by_the_distributed_recipe(uninterrupted, tmp_path):
    single, _, _ = uninterrupted
    out = tmp_path / "copy"
    shutil.copytree(single, out)
    run = tune_run(out, *COMMON, *ONE_DEVICE, "resume_from_checkpoint=True", "epochs=3", nproc=1)
    assert run.returncode != 0
    errors = [ln for ln in run.stderr_text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "written by the one-device recipe" in errors[0], run.stderr_text[-3000:]
    assert pointer(out) == "step_0000020"


def test_a_config_mistake_is_reported_once_and_nothing_is_written(tmp_path):
    out = tmp_path / "out"
    run = tune_run(out, "checkpointer.checkpoint_dir=assets/nowhere", nproc=2)
    assert run.returncode != 0
    errors = [ln for ln in run.stderr_text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "assets/nowhere" in errors[0], run.stderr_text[-3000:]
    assert not out.exists()


def test_without_torchrun_it_says_how_to_launch(tmp_path):
    from conftest import tune

    result = tune("run", "lora_finetune_distributed.py", "--config", "configs/tiny.yaml", f"output_dir={tmp_path}/o")
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith(TORCHAO_NOTICE)]
    assert len(lines) == 1 and "--nproc_per_node" in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def untied_base(folder: Path) -> Path:
    """The tiny model with its own output layer (lm_head) instead of the tied embedding."""
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    weights = load_file(TINY / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf_config = json.loads((TINY / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf_config, "tie_word_embeddings": False}))
    return folder


def test_untied_output_lora_with_a_process_that_has_no_trained_token(tmp_path):
    """An untied head with LoRA, 2 processes, and every micro-batch of process 1 without a trained token (its
    prompts are cut at max_seq_len before the answer): its output-LoRA gradients must be zeros, not missing, so
    both processes reduce the same gradients. Same training as one device with the same global batch.

    torchtune's Llama 3.2 builders refuse apply_lora_to_output (their head is tied), so the tiny weights run
    under the Llama 3 builder, whose head is its own layer."""
    rows = []
    for i in range(10):
        rows.append({"instruction": f"What color is the {THINGS[i]}?", "input": "", "output": "It is red."})
        rows.append({"instruction": " ".join(THINGS * 3), "input": "", "output": "Never reached."})
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    common = [
        f"checkpointer.checkpoint_dir={untied_base(tmp_path / 'untied')}",
        "model._component_=torchtune.models.llama3.lora_llama3",
        "model.apply_lora_to_output=True",
        "checkpointer.model_type=LLAMA3",
        "tokenizer.max_seq_len=48",
        f"dataset.data_files={data}",
        "shuffle=False",  # process r takes samples r, r + 2, ...: process 1 gets only the long ones
        "val_dataset=null",
        "sample_prompts=[]",
        "max_steps_per_epoch=5",
        "lr_scheduler.num_warmup_steps=1",
        "metric_logger.filename=log.txt",
        *SGD,
    ]
    single = tune_run(tmp_path / "single", *common, "batch_size=2")
    assert single.returncode == 0, single.stderr_text[-3000:]
    multi = tune_run(tmp_path / "multi", *common, "batch_size=1", nproc=2, timeout=180)
    assert multi.returncode == 0, multi.stderr_text[-3000:]
    assert_same_training(tmp_path / "single", tmp_path / "multi")
    trained = final_adapter(tmp_path / "multi")["output.lora_b.weight"].abs().max().item()
    assert trained > 10 * rounding(SUM_LENGTH) * max(sgd_travel(tmp_path / "single", "log.txt", MOMENTUM).values())
