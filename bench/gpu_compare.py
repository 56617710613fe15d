"""GPU side-by-side benchmark: this project's SFTTrainer against transformers' Trainer (padded, padding-free).

The work of the GPU anchor (shared/anchors/gpu_anchor.py): random-initialised models with the exact shapes of
SmolLM2-135M (batch 16) and Llama-3.2-1B (batch 4 and 8), variable-length rows of random tokens with
log-normal lengths (mean ~560, clipped to 32..2048), every token trained, sdpa attention, bf16 mixed
precision, full fine-tuning. Each (shape, contender) runs in its own process; the table gives trained
tokens/s over the timed steps, MFU (6N per token plus causal attention, against 989 TFLOP/s dense bf16) and
peak GPU memory.
Run through bench/gpu.sh on the GPU machine; `--cpu` is a tiny smoke run of the same code on the CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from _workload import (
    SEED,
    StepClock,
    emit_result,
    markdown_table,
    peak_memory_mib,
    run_child,
    run_hf,
    run_ours,
)
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PEAK_FLOPS = 989e12  # H100 SXM dense bf16, datasheet
MAX_LEN = 2048
SHAPES = {
    "smollm2-135m": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
    },
    "llama-1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}
CASES = ["smollm2-135m:16", "llama-1b:4", "llama-1b:8"]
CONTENDERS = ["hf_padded", "hf_padfree", "ours_padded", "ours_packed"]


def synthetic_rows(n: int, vocab_size: int) -> list[dict[str, list[int]]]:
    """The anchor's rows: log-normal lengths (seed 0), random tokens (seed 1), labels = input_ids."""
    lengths = torch.exp(torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.8 + 6.0).clamp(
        32, MAX_LEN
    )
    tokens = torch.Generator().manual_seed(1)
    rows = []
    for length in lengths.long().tolist():
        ids = torch.randint(3, vocab_size, (length,), generator=tokens).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def placeholder_tokenizer() -> PreTrainedTokenizerFast:
    """A two-token tokenizer (pad id 0) for `SFTTrainer`, which wants one; the rows are already token ids."""
    vocab = {"<pad>": 0, "<unk>": 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


def flops_per_token(params: int, shape: dict[str, int], rows: list[dict]) -> float:
    """Training FLOPs per token, as the anchor counts them: 6N plus causal attention (6·L·H·l per token of a
    row of length l), averaged over the rows' tokens."""
    lengths = [len(r["input_ids"]) for r in rows]
    attention = (
        6 * shape["num_hidden_layers"] * shape["hidden_size"] * sum(n * n for n in lengths) / sum(lengths)
    )
    return 6 * params + attention


def child(name: str, case: str, warmup: int, steps: int) -> None:
    """Train one contender on one case and print its result line (an `error` entry on out-of-memory)."""
    shape_name, batch = case.split(":")
    shape, batch_size = SHAPES[shape_name], int(batch)
    rows = synthetic_rows(batch_size * (warmup + steps), shape["vocab_size"])
    config = LlamaConfig(
        max_position_embeddings=4096, tie_word_embeddings=True, attn_implementation="sdpa", **shape
    )
    torch.manual_seed(SEED)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    bf16 = torch.cuda.is_available()
    clock = StepClock()
    result: dict[str, Any] = {"run": name, "case": case}
    try:
        if name.startswith("hf_"):
            run_hf(
                model,
                rows,
                clock,
                padding_free=name == "hf_padfree",
                batch_size=batch_size,
                max_steps=warmup + steps,
                bf16=bf16,
            )
        else:
            run_ours(
                model,
                placeholder_tokenizer(),
                rows,
                clock,
                packing=name == "ours_packed",
                batch_size=batch_size,
                max_seq_length=MAX_LEN,
                max_steps=warmup + steps,
                lora=False,
                mixed_precision="bf16" if bf16 else None,
            )
    except torch.OutOfMemoryError:
        emit_result({**result, "error": "out of memory", "peak_mib": peak_memory_mib()})
        return
    summary = clock.summary(warmup, steps)
    mfu = summary["tokens_per_s"] * flops_per_token(params, shape, rows) / PEAK_FLOPS
    emit_result({**result, **summary, "mfu": mfu, "peak_mib": peak_memory_mib(), "params": params})


def report(results: list[dict[str, Any]]) -> str:
    """One row per (case, contender): tokens/s, ratio to HF padded on that case, MFU, peak memory, loss."""
    padded = {r["case"]: r.get("tokens_per_s") for r in results if r["run"] == "hf_padded"}
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["case"], r["run"], *["—"] * 6, r["error"][:100]])
            continue
        base = padded.get(r["case"])
        ratio = f"{r['tokens_per_s'] / base:.2f}×" if base else "—"
        rows.append(
            [
                r["case"],
                r["run"],
                f"{r['tokens_per_s']:,.0f}",
                ratio,
                f"{r['mfu']:.1%}",
                f"{r['peak_mib'] / 1024:.1f}",
                f"{r['final_loss']:.4f}",
                f"{r['tokens_per_step']:,.0f}",
                "",
            ]
        )
    headers = [
        "shape:batch",
        "contender",
        "tokens/s",
        "vs hf_padded",
        "MFU",
        "peak GiB",
        "final loss",
        "tokens/step",
        "note",
    ]
    return markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="tiny smoke run on the CPU")
    parser.add_argument(
        "--cases", nargs="+", default=CASES, help=f"shape:batch cases (default {' '.join(CASES)})"
    )
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, default=CONTENDERS, help="contenders to run")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps, at least 1 (default 5)")
    parser.add_argument(
        "--deadline-s", type=float, default=420, help="start no new run after this many seconds (default 420)"
    )
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: run one contender in this process
    args = parser.parse_args()
    if args.cpu:
        args.cases, args.steps, args.warmup = ["tiny:4"], 2, 1
    if args.run:
        child(args.run, args.cases[0], args.warmup, args.steps)
        return

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    precision = "bf16" if torch.cuda.is_available() else "fp32"
    print(
        f"{device}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{args.warmup} warm-up + {args.steps} timed steps, {precision}",
        flush=True,
    )
    started = time.perf_counter()
    results = []
    for case in args.cases:
        for name in args.only:
            left = args.deadline_s - (time.perf_counter() - started)
            if left <= 0:
                results.append({"run": name, "case": case, "error": "skipped: past the deadline"})
                continue
            child_args = ["--cases", case, "--warmup", str(args.warmup), "--steps", str(args.steps)]
            result = {"case": case, **run_child(Path(__file__), name, child_args, timeout_s=left + 60)}
            results.append(result)
            print(json.dumps(result), flush=True)
    print()
    print(report(results))


if __name__ == "__main__":
    main()
