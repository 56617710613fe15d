"""Batched generation (`app.sft.generation.generate_all`, what GenerationEvalCallback runs) against one prompt at
a time through `model.generate`, on the same 64 prompts of the demo task with the demo model (SmolLM2-135M-Instruct,
CPU), greedy, the same token limit and stop tokens.

    .venv/bin/python bench/generation_speed.py [--reps 2] [--batch-size 16] [--max-new-tokens 48] [--threads N]
    .venv/bin/python bench/generation_speed.py --demo-run outputs/demo    # also: generation's share of a demo run

The contenders alternate (order rotated every repetition), so load from other processes hits both alike; the
table gives the median prompts/s of each and their ratio. Both produce the same answers (checked).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "backend"))

from app.sft.config import SFTConfig
from app.sft.data import load_rows, resolve_template
from app.sft.generation import generate_all, generation_prompts, stop_token_ids
from app.sft.metrics_log import read_metrics
from app.sft.modeling import load_model_and_tokenizer

CONFIG = ROOT / "examples/configs/demo.yaml"
NUM_PROMPTS = 64


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="the demo config (its model and data)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice, every core)")
    parser.add_argument("--demo-run", type=Path, help="a finished demo run: report generation's share of its time")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = SFTConfig.from_yaml(args.config)
    model, tokenizer = load_model_and_tokenizer(config)
    model.eval()
    template = resolve_template(config, tokenizer)
    rows = list(load_rows(str(ROOT / config.eval_dataset_name))) + list(load_rows(str(ROOT / config.dataset_name)))
    prompts = generation_prompts(rows[:NUM_PROMPTS], tokenizer, dataset_format=config.dataset_format,
                                 template=template)
    ids = [p.input_ids for p in prompts]
    stops = stop_token_ids(model, tokenizer, template)
    settings = {"max_new_tokens": args.max_new_tokens, "stop_ids": stops}

    def batched() -> list[str]:
        return [a.text for a in generate_all(model, tokenizer, ids, batch_size=args.batch_size, **settings)]

    def one_at_a_time() -> list[str]:
        answers = []
        with torch.no_grad():
            for prompt in ids:
                output = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                        max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=stops,
                                        pad_token_id=tokenizer.pad_token_id)
                answers.append(tokenizer.decode(output[0, len(prompt):], skip_special_tokens=True).strip())
        return answers

    contenders = {"batched": batched, "one_at_a_time": one_at_a_time}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    answers: dict[str, list[str]] = {}
    print(f"{len(ids)} prompts, {torch.get_num_threads()} threads, max_new_tokens {args.max_new_tokens}, "
          f"batch size {args.batch_size}", flush=True)
    for rep in range(args.reps):
        names = list(contenders) if rep % 2 == 0 else list(reversed(contenders))
        for name in names:
            started = time.perf_counter()
            answers[name] = contenders[name]()
            times[name].append(time.perf_counter() - started)
            print(f"  rep {rep + 1} {name}: {times[name][-1]:.1f} s", flush=True)
    same = sum(a == b for a, b in zip(answers["batched"], answers["one_at_a_time"], strict=True))
    rate = {name: len(ids) / statistics.median(t) for name, t in times.items()}
    print("\n| contender | median s | prompts/s |\n|---|---|---|")
    for name in contenders:
        print(f"| {name} | {statistics.median(times[name]):.1f} | {rate[name]:.2f} |")
    print(f"\nbatched / one at a time: {rate['batched'] / rate['one_at_a_time']:.2f}x; "
          f"identical answers: {same} of {len(ids)}")

    if args.demo_run is not None:
        records = read_metrics(args.demo_run / "metrics.jsonl")
        gen = sum(r.get("gen_time_s") or 0.0 for r in records if r.get("type") == "eval")
        summary = json.loads((args.demo_run / "training_summary.json").read_text())
        runtime = summary["runtime_s"]
        print(f"demo run {args.demo_run}: generation evaluation {gen:.1f} s of {runtime:.1f} s training "
              f"({100 * gen / runtime:.0f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
