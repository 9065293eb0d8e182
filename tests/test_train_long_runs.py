"""Long runs: atomic checkpoints, exact resume after SIGKILL, Ctrl-C, validation loss and the run's figures,
and two-process DDP on the CPU writing one adapter."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from medtune.sft_trainer import checkpoints, last_checkpoint

STEPS, SAVE = 12, 4


def _train_cmd(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    # threads=1 + deterministic: CPU runs are bit-reproducible, so a resumed run can equal an uninterrupted one.
    return [sys.executable, "-m", "medtune", "train", "--model", str(model), "--data", str(data), "--output", str(out),
            "--profile", "cpu", "--max-steps", str(STEPS), "--micro-batch", "4", "--max-seq-len", "512",
            "--logging-steps", "1", "--seed", "0", "--threads", "1", "--deterministic", "--eval-steps", "0",
            "--no-tensorboard", "--save-steps", str(SAVE), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _lora(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


def test_resume_finds_only_complete_checkpoints(tmp_path: Path):
    for name, complete in (("checkpoint-4", True), ("checkpoint-12", False), ("checkpoint-x", True)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "trainer_state.json").write_text("{}")
    (tmp_path / ".incomplete" / "checkpoint-16").mkdir(parents=True)
    (tmp_path / ".incomplete" / "checkpoint-16" / "trainer_state.json").write_text("{}")
    assert checkpoints(tmp_path) == [tmp_path / "checkpoint-4"]
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-4" and last_checkpoint(tmp_path / "none") is None


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_equals_an_uninterrupted_run(
        tiny_model_dir: Path, qa32_dir: Path, tmp_path: Path):
    reference = subprocess.run(_train_cmd(tiny_model_dir, qa32_dir, tmp_path / "ref"), env=_env(),
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(tiny_model_dir, qa32_dir, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stderr.read(64), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 600
    # Strictly between two checkpoints: checkpoint-4 is complete and the progress bar shows step 5 or later.
    while not ((out / "checkpoints" / f"checkpoint-{SAVE}").is_dir()
               and re.search(rf"\b([5-7])/{STEPS}\b", "".join(seen))):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(seen)[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert [p.name for p in checkpoints(out / "checkpoints")] == [f"checkpoint-{SAVE}"]
    assert not (out / "adapter_model.safetensors").exists()

    resumed = subprocess.run(_train_cmd(tiny_model_dir, qa32_dir, out, "--resume", "latest"), env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / f'checkpoint-{SAVE}'} (step {SAVE})" in resumed.stderr
    manifest = json.loads((out / "medtune.json").read_text(encoding="utf-8"))
    assert manifest["result"]["steps"] == STEPS and manifest["result"]["resumed_from_step"] == SAVE

    ours, theirs = _lora(out), _lora(tmp_path / "ref")
    assert ours.keys() == theirs.keys() and ours
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst <= 1e-6, worst
    assert any(t.abs().sum() > 0 for k, t in ours.items() if "lora_B" in k)  # trained, not two zero adapters


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits(tiny_model_dir: Path, qa32_dir: Path, tmp_path: Path):
    out = tmp_path / "interrupted"
    cmd = _train_cmd(tiny_model_dir, qa32_dir, out)
    cmd[cmd.index("--save-steps") + 1] = "0"  # no periodic checkpoints: the one found is Ctrl-C's
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stderr.read(64), "")), daemon=True).start()
    deadline = time.monotonic() + 600
    while not re.search(rf"\b([2-9])/{STEPS}\b", "".join(seen)):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(seen)[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    [saved] = checkpoints(out / "checkpoints")
    assert 2 <= int(saved.name.split("-")[1]) < STEPS
    assert "continue with --resume latest" in "".join(seen)
    assert not (out / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_validation_loss_tensorboard_and_the_figures(tiny_model_dir: Path, qa32_dir: Path, tmp_path: Path):
    from medtune.config import ModelArgs
    from medtune.train import TrainArgs, train

    out = train(ModelArgs(model=str(tiny_model_dir), profile="cpu"), qa32_dir, tmp_path / "a",
                TrainArgs(max_steps=5, micro_batch=4, max_seq_len=512, eval_steps=2, eval_samples=8, logging_steps=1,
                          threads=2))
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 5]  # every 2 steps and at the end
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "runs").rglob("*"))
    result = json.loads((out / "medtune.json").read_text(encoding="utf-8"))["result"]
    assert result["peak_memory_bytes"] > 50 * 2**20
    assert result["final_eval_loss"] == [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
    assert 0 <= result["padding_fraction"] < 0.05


@pytest.mark.slow
def test_two_process_ddp_on_the_cpu_writes_one_adapter(tiny_model_dir: Path, sample_csv: Path, tmp_path: Path):
    text = sample_csv.read_bytes().decode("gb18030")
    raw = tmp_path / "raw.csv"  # raw data: one process prepares it while the other waits
    raw.write_text("".join(text.splitlines(keepends=True)[:201]), encoding="utf-8")
    out = tmp_path / "ddp"
    # torchrun, not `accelerate launch --cpu`: accelerate starts several CPU processes only through mpirun and
    # otherwise runs one, which would pass this test without any DDP.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "medtune",
           "train", "--model", str(tiny_model_dir), "--data", str(raw), "--output", str(out),
           "--profile", "cpu", "--max-steps", "2", "--micro-batch", "2", "--max-seq-len", "512", "--eval-steps", "0",
           "--no-tensorboard", "--logging-steps", "1"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (out / "adapter_model.safetensors").is_file() and (out.with_name("ddp-data") / "train.parquet").is_file()
    manifest = json.loads((out / "medtune.json").read_text(encoding="utf-8"))
    assert manifest["result"]["steps"] == 2
    assert done.stderr.count("INFO medtune.train: padding:") == 2  # two processes trained
    assert done.stderr.count("wrote the adapter") == 1  # one process saved it
    assert len(list(tmp_path.glob("ddp*"))) == 2  # the adapter and its prepared data, nothing else
    assert not (out / "checkpoints").exists()  # no --save-steps: its empty folder removed, once every rank was done
