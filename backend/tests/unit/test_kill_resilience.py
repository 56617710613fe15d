"""A training process SIGKILLed at random moments (mostly while saving) always leaves a run that resumes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.sft import checkpointing
from app.sft.metrics_log import read_metrics

TESTS_DIR = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests_dir!r}); sys.path.insert(0, {unit_dir!r})
    from helpers import build_tiny_tokenizer, tiny_llama
    from test_trainer import instruction_rows, make_config
    from app.sft import SFTTrainer, checkpointing
    from pathlib import Path

    config = make_config(Path({run_dir!r}), Path({model_dir!r}), use_lora=True, lora_r=4, max_steps={max_steps},
                         save_steps=1, save_total_limit=3, batch_size=2)
    resume = "latest" if checkpointing.list_checkpoints(config.resolved_checkpoint_dir) else None
    trainer = SFTTrainer(config, model=tiny_llama(), tokenizer=build_tiny_tokenizer(),
                         train_dataset=instruction_rows(32))
    trainer.train(resume_from_checkpoint=resume)
    """
)


def newest_step(checkpoint_dir: Path) -> int:
    found = checkpointing.list_checkpoints(checkpoint_dir)
    return checkpointing.checkpoint_step(found[-1]) if found else 0


def child_script(tmp_path: Path, run_dir: Path, model_dir: Path, max_steps: int) -> Path:
    script = tmp_path / f"child_{run_dir.name}.py"
    script.write_text(CHILD.format(tests_dir=str(TESTS_DIR), unit_dir=str(TESTS_DIR / "unit"), run_dir=str(run_dir),
                                   model_dir=str(model_dir), max_steps=max_steps))
    return script


def kill_and_resume(tmp_path: Path, model_dir: Path, kills: int, max_steps: int = 100000) -> Path:
    """Start, kill and restart the training child `kills` times; returns the run's folder."""
    run_dir = tmp_path / "run"
    script = child_script(tmp_path, run_dir, model_dir, max_steps)
    checkpoint_dir = run_dir / "out" / "checkpoints"
    rng = random.Random(0)
    for kill in range(kills):
        before = newest_step(checkpoint_dir)
        child = subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + 120
        while (
            newest_step(checkpoint_dir) <= before
        ):  # wait until it resumed and saved past the last checkpoint
            if child.poll() is not None:
                pytest.fail(
                    f"kill {kill}: the training process exited early:\n{child.stderr.read().decode()}"
                )
            if time.monotonic() > deadline:
                child.kill()
                pytest.fail(f"kill {kill}: no new checkpoint within 120 s")
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stderr.close()
        for checkpoint in checkpointing.list_checkpoints(checkpoint_dir):  # every listed checkpoint loads
            state, callbacks = checkpointing.read_trainer_state(checkpoint)
            assert state["global_step"] == checkpointing.checkpoint_step(checkpoint)
            assert (checkpoint / "adapter_model.safetensors").is_file()
        assert checkpointing.is_complete(checkpointing.resolve_checkpoint(checkpoint_dir, "latest"))
    return run_dir


def test_five_random_kills_each_resume_from_latest(tmp_path, tiny_model_dir):
    kill_and_resume(tmp_path, tiny_model_dir, kills=5)


def test_kills_while_saving_every_step_end_with_the_uninterrupted_weights_and_metrics(tmp_path, tiny_model_dir):
    steps = 40
    run_dir = kill_and_resume(tmp_path, tiny_model_dir, kills=4, max_steps=steps)
    subprocess.run([sys.executable, str(child_script(tmp_path, run_dir, tiny_model_dir, steps))], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)  # the last resume finishes
    reference_dir = tmp_path / "reference"
    subprocess.run([sys.executable, str(child_script(tmp_path, reference_dir, tiny_model_dir, steps))], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    killed = load_file(run_dir / "out" / "adapter_model.safetensors")
    reference = load_file(reference_dir / "out" / "adapter_model.safetensors")
    assert killed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(killed[name], tensor), name
    records = [r for r in read_metrics(run_dir / "out" / "metrics.jsonl") if r["type"] == "train"]
    expected = [r for r in read_metrics(reference_dir / "out" / "metrics.jsonl") if r["type"] == "train"]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert [r["loss"] for r in records] == [r["loss"] for r in expected]


@pytest.mark.slow
def test_twenty_random_kills_each_resume_from_latest(tmp_path, tiny_model_dir):
    kill_and_resume(tmp_path, tiny_model_dir, kills=20)
