"""GPU side-by-side benchmark: this project's SFTTrainer against transformers' Trainer, in one run.

The work of the GPU anchor (shared/anchors/gpu_anchor.py): random-initialised models with the exact shapes of
SmolLM2-135M and Llama-3.2-1B, variable-length rows of random tokens with log-normal lengths (mean ~560,
clipped to 32..2048), every token trained, bf16 mixed precision; full fine-tuning, and LoRA (r 16, alpha 32,
every linear layer but the head) on cases named `shape:batch:lora`. Each (case, contender) cell runs in its own
process, in the order of `PLAN` until the deadline; the table gives trained tokens/s over the timed steps, the
ratio to HF padded and to the fastest HF configuration of the case, MFU (6N per token plus causal attention,
against 989 TFLOP/s dense bf16), peak GPU memory, the final loss, the seconds from the model's build to the end of
the first step, and the contender's whole time (model build to clean-up; the process's start-up not included).
Run through bench/gpu.sh on the GPU machine; `--cpu` is a tiny smoke run of the same code on the CPU.
"""

from __future__ import annotations

import argparse
import gc
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
    run_children,
    run_hf,
    run_ours,
    with_lora,
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
CONTENDERS: dict[str, dict[str, Any]] = {
    # transformers.Trainer: right-padded rows (sdpa), DataCollatorWithFlattening (sdpa), the same with
    # flex_attention (the fastest HF configuration measured on an H100, shared/anchors/README.md)
    "hf_padded": {"hf": True, "padding_free": False, "attn": "sdpa"},
    "hf_padfree": {"hf": True, "padding_free": True, "attn": "sdpa"},
    "hf_flex": {"hf": True, "padding_free": True, "attn": "flex_attention"},
    # ours: padded rows, packed rows (one varlen attention call per layer on CUDA), and one lever each on top
    "ours_padded": {"hf": False, "packing": False},
    "ours_packed": {"hf": False, "packing": True},
    "ours_packed_compile": {"hf": False, "packing": True, "torch_compile": True},
    "ours_packed_liger": {"hf": False, "packing": True, "use_liger_kernel": True},
}
HF_CONTENDERS = [name for name, spec in CONTENDERS.items() if spec["hf"]]
# The cells in the order they run, a process for each group (start-up is ~20 s of a cell on the GPU machine):
# the cases first, then the levers, then the contenders that compile (in processes of their own, as
# Liger, which patches transformers' Llama module for the whole process) and the batch-16 fit check.
PLAN: list[tuple[str, list[list[str]]]] = [  # the cells no GPU run has measured yet come first
    ("llama-1b:8", [["hf_padded", "ours_padded", "ours_packed"]]),
    ("smollm2-135m:16", [["hf_padded", "hf_padfree", "ours_padded", "ours_packed"]]),
    ("llama-1b:8:lora", [["hf_padded", "hf_padfree", "ours_packed"]]),
    ("llama-1b:4", [["hf_padded", "hf_padfree", "ours_packed"]]),
    ("llama-1b:8", [["ours_packed_liger"], ["ours_packed_compile"]]),
    ("smollm2-135m:16", [["ours_packed_compile"], ["hf_flex"]]),
    ("llama-1b:8", [["hf_flex"]]),
    ("llama-1b:16", [["hf_padded", "ours_packed"]]),
]


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


def child(names: list[str], case: str, warmup: int, steps: int) -> None:
    """Train each contender of `names` on one case, one after another in this process (a fresh seeded model each,
    peak memory counted anew), and print a result line for each (an `error` entry on out-of-memory)."""
    shape_name, batch, *variant = case.split(":")
    shape, batch_size, lora = SHAPES[shape_name], int(batch), variant == ["lora"]
    rows = synthetic_rows(batch_size * (warmup + steps), shape["vocab_size"])
    bf16 = torch.cuda.is_available()
    for name in names:
        spec = CONTENDERS[name]
        result: dict[str, Any] = {"run": name, "case": case}
        started = time.perf_counter()
        clock = StepClock()
        params = 0
        try:
            config = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=True,
                                 attn_implementation=spec.get("attn", "sdpa"), **shape)
            torch.manual_seed(SEED)
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # built on the device: no copy
                model = LlamaForCausalLM(config)
            params = sum(p.numel() for p in model.parameters())
            if spec["hf"]:
                run_hf(with_lora(model) if lora else model, rows, clock, padding_free=spec["padding_free"],
                       batch_size=batch_size, max_steps=warmup + steps, bf16=bf16)
            else:
                levers = {k: spec[k] for k in ("torch_compile", "use_liger_kernel") if k in spec}
                run_ours(model, placeholder_tokenizer(), rows, clock, packing=spec["packing"],
                         batch_size=batch_size, max_seq_length=MAX_LEN, max_steps=warmup + steps, lora=lora,
                         mixed_precision="bf16" if bf16 else None, **levers)
            summary = clock.summary(warmup, steps)
            mfu = summary["tokens_per_s"] * flops_per_token(params, shape, rows) / PEAK_FLOPS
            result.update(summary, mfu=mfu, peak_mib=peak_memory_mib(), params=params)
        except torch.OutOfMemoryError:
            result.update(error="out of memory", peak_mib=peak_memory_mib())
        except Exception as error:  # noqa: BLE001 (one contender's failure is a result; the others still run)
            result["error"] = f"{type(error).__name__}: {error}"[:300]
        result["setup_s"] = (clock.times[0] - started) if clock.times else None  # model, set-up, first step
        result["cell_s"] = time.perf_counter() - started
        emit_result(result)
        model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def report(results: list[dict[str, Any]]) -> str:
    """One row per cell: tokens/s, ratios to HF padded and to the fastest HF contender of the case, MFU, peak
    memory (and its ratio to HF padded), final loss, tokens per step, the cell's wall time."""
    def best_hf(case: str) -> float | None:
        speeds = [r["tokens_per_s"] for r in results if r["case"] == case and r["run"] in HF_CONTENDERS
                  and "error" not in r]
        return max(speeds, default=None)

    padded = {r["case"]: r for r in results if r["run"] == "hf_padded" and "error" not in r}
    rows = []
    for r in results:
        wall = f"{r['cell_s']:.0f}" if r.get("cell_s") else "—"
        setup = f"{r['setup_s']:.0f}" if r.get("setup_s") else "—"
        if "error" in r:
            rows.append([r["case"], r["run"], *["—"] * 8, setup, wall, r["error"][:100]])
            continue
        base, best = padded.get(r["case"]), best_hf(r["case"])
        rows.append([
            r["case"],
            r["run"],
            f"{r['tokens_per_s']:,.0f}",
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}×" if base else "—",
            f"{r['tokens_per_s'] / best:.2f}×" if best else "—",
            f"{r['mfu']:.1%}",
            f"{r['peak_mib'] / 1024:.1f}",
            f"{r['peak_mib'] / base['peak_mib']:.2f}" if base else "—",
            f"{r['final_loss']:.4f}",
            f"{r['tokens_per_step']:,.0f}",
            setup,
            wall,
            "",
        ])
    headers = ["case", "contender", "tokens/s", "vs hf_padded", "vs best HF", "MFU", "peak GiB",
               "peak vs hf_padded", "final loss", "tokens/step", "to step 1 s", "cell s", "note"]
    return markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny smoke run on the CPU")
    parser.add_argument("--cases", nargs="+", help="shape:batch[:lora] cases (default: every case of PLAN)")
    parser.add_argument("--only", nargs="+", choices=list(CONTENDERS), help="contenders to run (default: PLAN's)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps, at least 1 (default 3)")
    parser.add_argument("--deadline-s", type=float, default=380,
                        help="start no new cell after this many seconds (default 380)")
    parser.add_argument("--json", type=Path, help="also write every result to this JSON file")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: run one contender in this process
    args = parser.parse_args()
    if args.run:
        child(args.run.split(","), args.cases[0], args.warmup, args.steps)
        return
    plan = [(case, groups) for case, groups in PLAN if args.cases is None or case in args.cases]
    if args.cases:
        plan += [(case, [[name] for name in CONTENDERS]) for case in args.cases if case not in dict(PLAN)]
    if args.cpu:  # every contender the CPU can run, on a tiny model, full fine-tuning and LoRA
        plan = [("tiny:4", [["hf_padded", "hf_padfree", "ours_padded", "ours_packed"]]),
                ("tiny:4:lora", [["hf_padded", "ours_packed"]])]
        args.steps, args.warmup = 2, 1
    if args.only:
        plan = [(case, [[n for n in group if n in args.only] for group in groups]) for case, groups in plan]

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    precision = "bf16" if torch.cuda.is_available() else "fp32"
    print(f"{device}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{args.warmup} warm-up + {args.steps} timed steps, {precision}", flush=True)
    started = time.perf_counter()
    results = []
    for case, groups in plan:
        for names in filter(None, groups):
            left = args.deadline_s - (time.perf_counter() - started)
            if left <= 0:
                results += [{"run": name, "case": case, "error": "skipped: past the deadline"} for name in names]
                continue
            child_args = ["--cases", case, "--warmup", str(args.warmup), "--steps", str(args.steps)]
            for result in run_children(Path(__file__), names, child_args, timeout_s=left + 90):
                results.append({"case": case, **result})
                print(json.dumps(results[-1]), flush=True)
    print()
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
