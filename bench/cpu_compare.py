"""CPU side-by-side benchmark: this project's SFTTrainer against transformers' Trainer and TRL's SFTTrainer.

Same work for every contender: 256 real ShareGPT conversations with SmolLM2's tokenizer and chat template,
labels on assistant turns only, cut to 512 tokens (built once, cached under ~/.cache/llm-playground/bench);
a random-initialised 15.5M-parameter Llama (same seed), batch 8, lr 1e-4, fp32, full fine-tuning (`--lora`
for LoRA r16 on every linear layer). Each contender runs in its own process, contenders alternate across
repetitions, and the table gives the median trained tokens/s over the timed steps (after warm-up), ratios
against the baselines, peak RSS and final loss.

    python bench/cpu_compare.py                # 3 repetitions, 3 warm-up + 20 timed steps
    python bench/cpu_compare.py --quick        # smoke run: 1 repetition, 1 warm-up + 2 timed steps
    python bench/cpu_compare.py --all-tokens   # loss on every token for every contender (the same work)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from _workload import (
    CACHE_DIR,
    SEED,
    CountingCollator,
    HFClockCallback,
    StepClock,
    build_work,
    emit_result,
    hf_arguments,
    llama_config,
    load_tokenizer,
    load_work,
    markdown_table,
    peak_memory_mib,
    run_child,
    run_hf,
    run_ours,
    with_lora,
)
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

N_CONVERSATIONS = 256
MAX_LEN = 512
BATCH_SIZE = 8
# TRL SFTConfig settings per contender: its defaults (gradient checkpointing on), then its fast settings
TRL_SETTINGS: dict[str, dict[str, Any]] = {
    "trl_default": {},
    "trl_padfree": {"padding_free": True, "max_length": None, "gradient_checkpointing": False},
    "trl_packed": {"packing": True, "gradient_checkpointing": False},
}
TRL_BEST = ("trl_padfree", "trl_packed")
CONTENDERS = ["hf_padded", "hf_padfree", *TRL_SETTINGS, "ours_padded", "ours_packed"]


def run_trl(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    clock: StepClock,
    *,
    max_steps: int,
    bf16: bool,
    **settings: Any,
) -> None:
    """TRL's `SFTTrainer` on the pre-tokenised rows (it keeps a given `labels` column as is); `settings`
    override its `SFTConfig` defaults."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    with tempfile.TemporaryDirectory() as output_dir:
        args = SFTConfig(
            **hf_arguments(output_dir, BATCH_SIZE, max_steps, bf16=bf16),
            **{"max_length": MAX_LEN, **settings},
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[HFClockCallback(clock)],
        )
        trainer.data_collator = CountingCollator(trainer.data_collator, clock)
        trainer.train()


def train(
    name: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    clock: StepClock,
    max_steps: int,
    lora: bool,
    bf16: bool,
) -> None:
    """Train contender `name` for `max_steps` optimizer steps, feeding `clock`; `bf16`: bf16 autocast."""
    if name.startswith("hf_"):
        run_hf(
            model,
            rows,
            clock,
            padding_free=name == "hf_padfree",
            batch_size=BATCH_SIZE,
            max_steps=max_steps,
            bf16=bf16,
        )
    elif name.startswith("trl_"):
        run_trl(model, tokenizer, rows, clock, max_steps=max_steps, bf16=bf16, **TRL_SETTINGS[name])
    else:
        run_ours(
            model,
            tokenizer,
            rows,
            clock,
            packing=name == "ours_packed",
            batch_size=BATCH_SIZE,
            max_seq_length=MAX_LEN,
            max_steps=max_steps,
            lora=lora,
            mixed_precision="bf16" if bf16 else None,
        )


def child(name: str, work: Path, warmup: int, steps: int, lora: bool, bf16: bool, all_tokens: bool) -> None:
    """Train one contender on the cached work and print its result line; `all_tokens`: loss on every token."""
    rows = load_work(work)
    if all_tokens:  # the same work for everyone: no contender can skip the output layer at unlabelled positions
        rows = [{"input_ids": row["input_ids"], "labels": list(row["input_ids"])} for row in rows]
    tokenizer = load_tokenizer()
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(llama_config(len(tokenizer)))
    params = sum(p.numel() for p in model.parameters())
    if lora and not name.startswith("ours"):
        model = with_lora(model)
    clock = StepClock()
    train(name, model, tokenizer, rows, clock, warmup + steps, lora, bf16)
    emit_result(
        {
            "run": name,
            **clock.summary(warmup, steps),
            "peak_mib": peak_memory_mib(),
            "params": params,
            "threads": torch.get_num_threads(),
        }
    )


def median_of(results: list[dict[str, Any]], key: str) -> float | None:
    """Median of `key` over the successful repetitions."""
    values = [r[key] for r in results if "error" not in r]
    return statistics.median(values) if values else None


def report(results: dict[str, list[dict[str, Any]]]) -> str:
    """The results table: median tokens/s, ratios against the baselines, peak RSS, final loss."""
    speed = {name: median_of(runs, "tokens_per_s") for name, runs in results.items()}
    measured_trl = [name for name in TRL_BEST if speed.get(name)]
    trl_best = max(measured_trl, key=lambda name: speed[name]) if measured_trl else None
    bases = {
        "hf_padded": speed.get("hf_padded"),
        "hf_padfree": speed.get("hf_padfree"),
        f"trl_best ({trl_best})": speed.get(trl_best),
    }

    def cell(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value is not None else "—"

    rows = []
    for name, runs in results.items():
        errors = [r["error"] for r in runs if "error" in r]
        ratios = [
            cell(speed[name] / base if speed[name] and base else None, ".2f") + "×" for base in bases.values()
        ]
        rows.append(
            [
                name,
                cell(speed[name], ",.0f"),
                *ratios,
                cell(median_of(runs, "peak_mib"), ",.0f"),
                cell(median_of(runs, "final_loss"), ".4f"),
                cell(median_of(runs, "step_s"), ".2f"),
                cell(median_of(runs, "tokens_per_step"), ",.0f"),
                f"{len(runs) - len(errors)}/{len(runs)}" + (f" ({errors[0][:80]})" if errors else ""),
            ]
        )
    headers = [
        "contender",
        "tokens/s",
        *(f"vs {b}" for b in bases),
        "peak RSS MiB",
        "final loss",
        "s/step",
        "tokens/step",
        "ok",
    ]
    return markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions of every contender (default 3)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps, at least 1 (default 3)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 repetition, 1 warm-up + 2 timed steps"
    )
    parser.add_argument(
        "--lora", action="store_true", help="LoRA (r16, all linear layers) instead of full FT"
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 mixed precision (autocast) for every contender instead of fp32; needs a CPU with native bf16",
    )
    parser.add_argument(
        "--all-tokens",
        action="store_true",
        help="loss on every token (labels = input ids) for every contender, instead of assistant turns only",
    )
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, help="run these contenders only")
    parser.add_argument(
        "--work",
        type=Path,
        default=CACHE_DIR / f"sharegpt-{N_CONVERSATIONS}x{MAX_LEN}.jsonl",
        help="cached work file (built if missing)",
    )
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: run one contender in this process
    args = parser.parse_args()
    if args.quick:
        args.reps, args.steps, args.warmup = 1, 2, 1
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")
    if args.run:
        child(args.run, args.work, args.warmup, args.steps, args.lora, args.bf16, args.all_tokens)
        return

    if not args.work.exists():
        print(f"building the work once: {args.work}", flush=True)
        build_work(args.work, N_CONVERSATIONS, MAX_LEN)
    import trl

    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads, {os.cpu_count()} cores), "
        f"transformers {transformers.__version__}, trl {trl.__version__}; {args.reps} reps x "
        f"({args.warmup} warm-up + {args.steps} timed steps), batch {BATCH_SIZE}, "
        f"{'LoRA' if args.lora else 'full fine-tuning'}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
        f"loss on {'every token' if args.all_tokens else 'assistant turns'}",
        flush=True,
    )
    names = args.only or CONTENDERS
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    child_args = ["--work", str(args.work), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    child_args += ["--lora"] if args.lora else []
    child_args += ["--bf16"] if args.bf16 else []
    child_args += ["--all-tokens"] if args.all_tokens else []
    for rep in range(args.reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:  # alternate the order across repetitions
            result = run_child(Path(__file__), name, child_args)
            results[name].append(result)
            print(json.dumps({"rep": rep, **result}), flush=True)
    print()
    print(report(results))


if __name__ == "__main__":
    main()
