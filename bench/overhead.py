"""Two small measurements of issue 8, side by side in one run.

1. Callback overhead: median optimizer-step time with no callbacks against all four seed callbacks attached
   (Validation, WandB offline, Checkpoint, plus a user SFTCallback) whose intervals do not fire, alternating.
2. Checkpoint write speed: MB/s of `SFTTrainer.save_checkpoint` (weights, optimizer, RNG, state, fsync, rename)
   beside `dd bs=1M conv=fsync` copying as many random bytes (from the page cache) to the same disk, alternating, for a small
   checkpoint (the 7.5M-parameter model: ~90 MB) and a full fine-tuning checkpoint of a 110M-parameter model
   (~1.1 GB, the size users save).

    .venv/bin/python bench/overhead.py [--reps 3] [--steps 12]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))

from app.sft import (
    CheckpointCallback,
    SFTCallback,
    SFTConfig,
    SFTTrainer,
    ValidationCallback,
    WandBCallback,
)

VOCAB = 8192


def model(hidden: int = 256, layers: int = 4) -> LlamaForCausalLM:
    """A random Llama; the default is 7.5M parameters, `model(768, 12)` 110M."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 19 // 8,
                                        num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                        num_key_value_heads=hidden // 64, tie_word_embeddings=True))


def tokenizer() -> PreTrainedTokenizerFast:
    """A placeholder tokenizer: the rows are token ids already, only the pad id and saving are needed."""
    backend = Tokenizer(WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


def rows(n: int = 256, length: int = 128) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(4, VOCAB, (length,), generator=g).tolist()} for _ in range(n)]


class StepTimes(SFTCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, trainer, step, metrics, **kwargs):
        self.times.append(metrics["step_time_s"])


def run(out: Path, steps: int, with_callbacks: bool) -> float:
    config = SFTConfig(base_model="random-init", output_dir=str(out), batch_size=8, max_steps=steps, use_lora=False,
                       validation_split=0, save_steps=10**6, eval_steps=10**6, disable_progress_bar=True,
                       max_seq_length=128, logging_steps=10**6)
    clock = StepTimes()
    callbacks: list[SFTCallback] = [clock]
    if with_callbacks:
        callbacks += [ValidationCallback(val_dataset=rows(8), eval_steps=10**6, eval_on_epoch_end=False),
                      WandBCallback(project="overhead-bench"),
                      CheckpointCallback(out / "ckpt", save_steps=10**6), SFTCallback()]
    trainer = SFTTrainer(config, callbacks=callbacks, model=model(), tokenizer=tokenizer(), train_dataset=rows())
    trainer.train()
    return statistics.median(clock.times[2:])


def save_speed(out: Path, hidden: int, layers: int, reps: int = 3) -> tuple[int, float, float]:
    """Checkpoint size in bytes, and median MB/s of `save_checkpoint` and of `dd` writing as many bytes."""
    config = SFTConfig(base_model="random-init", output_dir=str(out), batch_size=2, max_steps=1, use_lora=False,
                       validation_split=0, save_steps=10**6, disable_progress_bar=True, max_seq_length=32)
    trainer = SFTTrainer(config, model=model(hidden, layers), tokenizer=tokenizer(), train_dataset=rows(8, 32))
    trainer.train()  # the optimizer state exists after one step
    ours, dd, size = [], [], 0
    source = out / "random.bin"  # dd copies real (random) bytes, read from the page cache, not zeros
    for i in range(reps):
        started = time.perf_counter()
        path = Path(trainer.save_checkpoint(out / f"save_{i}" / "checkpoint_step_1"))
        ours.append(time.perf_counter() - started)
        size = sum(f.stat().st_size for f in path.iterdir())
        shutil.rmtree(path.parent)
        if not source.exists():
            with open(source, "wb") as f:
                f.writelines(os.urandom(2**20) for _ in range(max(size // 2**20, 1)))
        started = time.perf_counter()
        subprocess.run(["dd", f"if={source}", f"of={out / 'dd'}", "bs=1M", "conv=fsync"], check=True,
                       capture_output=True)
        dd.append(time.perf_counter() - started)
        (out / "dd").unlink()
    return size, size / statistics.median(ours) / 1e6, max(size // 2**20, 1) * 2**20 / statistics.median(dd) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("WANDB_DIR", tmp)
        plain, attached = [], []
        for rep in range(args.reps):
            plain.append(run(Path(tmp) / f"plain_{rep}", args.steps, False))
            attached.append(run(Path(tmp) / f"cb_{rep}", args.steps, True))
        p, a = statistics.median(plain), statistics.median(attached)
        print(f"step time, median of {args.reps} runs: no callbacks {p * 1000:.1f} ms, four callbacks "
              f"{a * 1000:.1f} ms ({(a / p - 1) * 100:+.2f}%)")
        for hidden, layers in ((256, 4), (768, 12)):
            size, ours, dd = save_speed(Path(tmp) / f"save_{hidden}", hidden, layers, args.reps)
            print(f"checkpoint write, {size / 1e6:.0f} MB: {ours:.0f} MB/s (save_checkpoint), dd bs=1M conv=fsync "
                  f"{dd:.0f} MB/s ({ours / dd:.2f}x)")


if __name__ == "__main__":
    main()
