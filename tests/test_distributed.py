"""Issue F: the FSDP2 recipe on 2 CPU processes (gloo) trains exactly as one device does, and resumes exactly
after one of its processes is killed."""

import os
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import TORCHAO_NOTICE, final_adapter, latest_checkpoint, logged_metrics, pointer, tune_run, wait_for

# 165 training samples (odd: the split across processes drops one, as one device's last partial batch does),
# a global batch of 8 as 2 micro-batches, 20 optimizer steps over 2 epochs, 37 held-out samples (odd: one
# process's share is padded) scored every 5 steps.
COMMON = [
    "dataset.split=train[:165]",
    "val_dataset.split=train[:37]",
    "gradient_accumulation_steps=2",
    "epochs=2",
    "max_steps_per_epoch=10",
    "lr_scheduler.num_warmup_steps=4",
    "run_val_every_n_steps=5",
    "~sample_prompts",
    "save_every_n_steps=4",
    "enable_activation_checkpointing=True",  # as the shipped multi-GPU config: wrapped layers, then sharded
]
ONE_DEVICE = ["batch_size=4"]  # 4 x 2 micro-batches = 8
TWO_PROCESSES = ["batch_size=2"]  # 2 x 2 micro-batches x 2 processes = 8


def per_step(out: Path, filename: str, key: str) -> dict[int, float]:
    return {step: m[key] for step, m in logged_metrics(out, filename).items() if key in m}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same 20 steps on one device and on 2 processes, each run without interruption."""
    root = tmp_path_factory.mktemp("uninterrupted")
    single = tune_run(root / "single", *COMMON, *ONE_DEVICE, "metric_logger.filename=log.txt")
    assert single.returncode == 0, single.stderr_text[-3000:]
    multi = tune_run(root / "multi", *COMMON, *TWO_PROCESSES, "metric_logger.filename=log.txt", nproc=2)
    assert multi.returncode == 0, multi.stderr_text[-3000:]
    return root / "single", root / "multi", multi


def assert_same_training(single: Path, multi: Path) -> None:
    """Per-step losses, validation losses and token counts to 1e-4; the final adapter to 1e-5."""
    for key in ("loss", "val_loss", "trained_tokens"):
        want, got = per_step(single, "log.txt", key), per_step(multi, "log.txt", key)
        assert sorted(got) == sorted(want) and want, key
        for step in want:
            assert got[step] == pytest.approx(want[step], abs=1e-4), (key, step)
    assert sorted(per_step(multi, "log.txt", "loss")) == list(range(1, 21))

    want, got = final_adapter(single), final_adapter(multi)
    assert want.keys() == got.keys()
    for name in want:
        assert (want[name] - got[name]).abs().max().item() <= 1e-5, name
    assert max(got[n].abs().max().item() for n in got if "lora_b" in n) > 1e-3  # the adapter did train


def test_two_processes_train_exactly_as_one_device(uninterrupted):
    single, multi, run = uninterrupted
    assert_same_training(single, multi)

    # Same outputs as one device: checkpoint layout, a single log (from the first process), the summary once.
    ckpt = latest_checkpoint(multi)
    assert ckpt.name == "step_0000020"
    layout = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*"))
    assert layout == sorted(str(p.relative_to(latest_checkpoint(single))) for p in latest_checkpoint(single).rglob("*"))
    assert len(list((multi / "logs").iterdir())) == 1
    assert run.stdout_text.count("held-out loss:") == 1


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
    t0 = time.monotonic()
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 60  # torchrun takes the whole job down; nothing hangs

    resumed = tune_run(
        out, *COMMON, *TWO_PROCESSES, "resume_from_checkpoint=True", "metric_logger.filename=log_resumed.txt", nproc=2
    )
    assert resumed.returncode == 0, resumed.stderr_text[-3000:]
    first_resumed = min(per_step(out, "log_resumed.txt", "loss"))
    assert first_resumed > 8  # it went on from a checkpoint (step 8, or a later one written before the kill landed)
    want = per_step(multi, "log.txt", "loss")
    got = per_step(out, "log_resumed.txt", "loss")
    assert sorted(got) == list(range(first_resumed, 21))
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step

    want, got = final_adapter(multi), final_adapter(out)
    for name in want:
        assert (want[name] - got[name]).abs().max().item() <= 1e-6, name


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
    want, got = final_adapter(multi), final_adapter(out)
    for name in want:
        assert (want[name] - got[name]).abs().max().item() <= 1e-6, name


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
