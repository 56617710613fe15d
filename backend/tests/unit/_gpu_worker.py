"""Trains the tiny Llama for `test_gpu.py` in a process of its own (so the CPU run can hide the GPU) and prints
the per-step losses as JSON: `python _gpu_worker.py OUT_DIR`. Padded and packed, each run for 8 steps and then
resumed from its step-4 checkpoint, all in one process (start-up is most of the time on a GPU machine)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers

import torch  # noqa: E402
from helpers import build_tiny_tokenizer, tiny_llama  # noqa: E402

from app.sft import SFTCallback, SFTConfig, SFTTrainer  # noqa: E402

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


class Losses(SFTCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step_end(self, trainer, step, metrics, **kwargs) -> None:
        self.losses.append(float(metrics["loss"]))


def rows(n: int) -> list[dict[str, str]]:
    """Instructions of different lengths, so that padded and packed batches differ."""
    return [{"instruction": " ".join(WORDS[: 1 + i % 7]), "output": " ".join(WORDS[i % 10 :: 2])} for i in range(n)]


def train(output_dir: Path, packing: bool, resume_from: str | None = None) -> list[float]:
    config = SFTConfig(base_model="tiny", dataset_format="alpaca", output_dir=str(output_dir), max_seq_length=64,
                       batch_size=4, learning_rate=1e-3, max_steps=8, save_steps=4, validation_split=0.0,
                       logging_steps=1, disable_progress_bar=True, seed=0, use_lora=False, warmup_ratio=0.0,
                       mixed_precision=None, packing=packing, audit_max_duplicate_share=1.0)
    losses = Losses()
    trainer = SFTTrainer(config, callbacks=[losses], model=tiny_llama(seed=0, hidden_size=64),
                         tokenizer=build_tiny_tokenizer(), train_dataset=rows(48))
    trainer.train(resume_from_checkpoint=resume_from)
    return losses.losses


def main() -> None:
    out = Path(sys.argv[1])
    result: dict = {"device": "cuda" if torch.cuda.is_available() else "cpu"}
    for name, packing in (("padded", False), ("packed", True)):
        run = out / name
        losses = train(run, packing)
        checkpoint = sorted(run.rglob("checkpoint_step_4"))[0]
        result[name] = {"losses": losses, "resumed": train(run, packing, resume_from=str(checkpoint))}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
