"""The `sft` command: train, check data, preview masks, evaluate, generate, chat, merge and report.

    sft train CONFIG [--set key=value ...] [--resume [CHECKPOINT] [--continue] | --overwrite] [--no-cache]
    sft validate CONFIG [--json]  sft preview CONFIG [-n 3]    sft eval TARGET [--generate]
    sft generate TARGET --prompt "..."     sft chat TARGET     sft merge RUN_DIR [--out DIR] [--dtype bf16]
    sft export RUN_DIR [--dtype q8_0]      sft report RUN_DIR  sft init [PATH]  sft config --defaults  sft templates
    sft serve TARGET [--host 127.0.0.1] [--port 8000] [--model-name NAME] [--api-key KEY]

TARGET is a run's output_dir, a checkpoint, a config file, a Hugging Face model folder (e.g. a run's
`merged/`), a Hub id or a `.gguf` file. Also `python -m app.sft`. Exit codes: 0 success, 2 a usage, config
or data error (one message on stderr, no traceback), 1 a runtime failure, 130 interrupted. Works unchanged
under `accelerate launch` and `torchrun`: only the main process (RANK 0) logs at INFO level and prints results.

Starting is fast: this module imports only the standard library; each command imports the parts of the
package it needs (torch, transformers, peft, datasets) inside its function, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from app.sft.console import console_logging, histogram, is_main_process, log_warning, print_data_stats

if TYPE_CHECKING:
    from app.sft.config import SFTConfig
    from app.sft.generation import Generator
    from app.sft.templates import Message

_USAGE_ERROR_CLASSES = (
    ("app.sft.config", "ConfigError"),
    ("app.sft.data", "DataError"),
    ("app.sft.checkpointing", "CheckpointError"),
    ("app.sft.templates", "TemplateError"),
    ("app.sft.report", "ReportError"),
)
"""Errors in what the user gave (exit code 2, one message, no traceback), besides missing/existing files.
Looked up only in modules already imported: an error class whose module was never loaded was never raised."""

_MARK_START, _MARK_END = "[[", "]]"
_COLOR_START, _COLOR_END = "\033[1;32m", "\033[0m"
_CUT_MARK = "[cut]"
_TARGET_HELP = (
    "a run's output_dir, one of its checkpoints, a config file (its base model), a Hugging Face model folder "
    "(e.g. RUN_DIR/merged), a Hub id or a .gguf file"
)
_CHAT_HELP = """chat commands (a line starting with '/' is never sent to the model; an unknown one is refused):
  /help          this list
  /reset         forget the conversation (the system message stays)
  /system TEXT   set the system message and start over (/system alone removes it)
  /exit          end the chat (Ctrl-D too)"""

_SERVE_HELP = """routes: GET /v1/models, POST /v1/chat/completions (messages, max_tokens, temperature, top_p, stop,
seed, stream). Prompts use the chat template the run trained with; temperature 0 answers as 'sft generate' does.
Requests are answered one at a time, in order (none is dropped); SIGTERM finishes the answers in flight, then
exits 0. For many users at once, serve the merged model with an inference engine instead, e.g. vLLM:
  sft merge outputs/demo && vllm serve outputs/demo/merged --served-model-name demo"""

def main(argv: list[str] | None = None) -> int:
    """Run the `sft` command with `argv` (default: `sys.argv[1:]`) and return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help/--version (0) or a usage error (2, argparse printed why)
        return exit_.code if isinstance(exit_.code, int) else 0
    if not sys.stderr.isatty():  # download/weight-loading bars would run into the command's own output
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with console_logging(args.debug), warnings.catch_warnings():
        warnings.showwarning = log_warning
        if not args.debug:  # libraries' notes to developers, not to the user of the command
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return args.handler(args)
        except KeyboardInterrupt:
            print(f"sft {args.command}: interrupted", file=sys.stderr)
            return 130
        except Exception as error:
            if args.debug:
                traceback.print_exc()
            if isinstance(error, _usage_errors()):
                print(f"sft {args.command}: error: {_message(error)}", file=sys.stderr)
                return 2
            hint = "" if args.debug else " (run with --debug for the traceback)"
            print(f"sft {args.command}: failed: {type(error).__name__}: {error}{hint}", file=sys.stderr)
            return 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `sft` and its subcommands; each ends its --help with real examples."""
    parser = argparse.ArgumentParser(
        prog="sft",
        description="Supervised fine-tuning of causal language models (LoRA, QLoRA or full).",
        epilog="examples:\n  sft init my.yaml --format chat && sft validate my.yaml && sft train my.yaml\n"
        "  sft chat outputs/demo\n\nRun 'sft COMMAND --help' for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sft {_version()}")
    parser.add_argument("--debug", action="store_true", help="debug logging, and tracebacks of failures")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    Handler = Callable[[argparse.Namespace], int]

    def command(name: str, handler: Handler, help_: str, examples: str, details: str = "") -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=(f"{details}\n\n" if details else "")
            + "examples:\n" + "\n".join(f"  {line}" for line in examples.strip().splitlines()),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(handler=handler)
        return sub

    train = command("train", _train, "train a model as a YAML config describes",
                    "sft train examples/configs/demo.yaml\n"
                    "sft train my.yaml --set learning_rate=1e-4 --set max_steps=200 --resume")
    train.add_argument("config", metavar="CONFIG", help="YAML config file")
    _add_overrides(train)
    start = train.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue from a checkpoint directory, or (without a value) from the latest one of the run",
    )
    start.add_argument("--overwrite", action="store_true",
                       help="start afresh in an output_dir that holds a run: delete that run's own files first")
    train.add_argument("--allow-data-change", action="store_true",
                       help="with --resume: train on when the data differs from what the checkpoint trained on "
                       "(the sample order is rebuilt); same as --set allow_data_change=true")
    train.add_argument(
        "--continue",
        dest="continue_after_stop",
        action="store_true",
        help="with --resume: train on even though early stopping or a callback ended the run",
    )

    _add_no_cache(train)

    validate = command("validate", _validate, "check a config and audit its data without loading model weights",
                       "sft validate examples/configs/demo.yaml\n"
                       "sft validate my.yaml --set max_seq_length=2048 --no-cache")
    validate.add_argument("config", metavar="CONFIG", help="YAML config file")
    validate.add_argument("--json", action="store_true", help="print only the data audit, as JSON (for machines)")
    _add_overrides(validate)
    _add_no_cache(validate)

    preview = command("preview", _preview, "show formatted training examples, trained tokens marked",
                      "sft preview examples/configs/demo.yaml -n 2\n"
                      "sft preview my.yaml --set template_name=chatml")
    preview.add_argument("config", metavar="CONFIG", help="YAML config file")
    preview.add_argument("-n", "--num-examples", type=_positive_int, default=3, help="how many (default 3)")
    _add_overrides(preview)

    evaluate = command("eval", _eval, "validation loss and perplexity of a base model or a trained run",
                       "sft eval outputs/demo\n"
                       "sft eval outputs/demo/merged --set eval_dataset_name=examples/data/demo_val.jsonl")
    evaluate.add_argument("target", metavar="TARGET", help=_TARGET_HELP)
    evaluate.add_argument("--generate", action="store_true",
                          help="answer the validation prompts and score the answers (gen_* metrics) instead")
    evaluate.add_argument("--metrics", help="with --generate: comma-separated metric names (default: the config's "
                          "generation_eval_metrics, else exact_match)")
    evaluate.add_argument("-n", "--num-samples", type=_positive_int, help="with --generate: the first N rows only")
    _add_overrides(evaluate)
    _add_no_cache(evaluate)

    generate = command("generate", _generate, "answer one prompt with a trained run (or any model)",
                       'sft generate outputs/demo --prompt "Name three primary colours."\n'
                       'sft generate outputs/demo/merged --prompt "Hi" --temperature 0.7 --max-new-tokens 64')
    generate.add_argument("target", metavar="TARGET", help=_TARGET_HELP)
    generate.add_argument("--prompt", required=True, help="the instruction or user message")
    generate.add_argument("--input", default="", help="an alpaca 'input' field to go with the prompt")
    _add_generation_options(generate)

    chat = command("chat", _chat, "chat interactively (stdin), the reply streamed as it is written; /help "
                   "lists the commands", "sft chat outputs/demo\n"
                   'sft chat outputs/demo/merged --system "Answer in one sentence." --temperature 0.7',
                   details=_CHAT_HELP)
    chat.add_argument("target", metavar="TARGET", help=_TARGET_HELP)
    _add_generation_options(chat)

    serve = command("serve", _serve, "answer OpenAI-compatible chat requests over HTTP (one process, requests "
                    "queued)", "sft serve outputs/demo\n"
                    "SFT_API_KEY=secret sft serve outputs/demo/merged --host 0.0.0.0 --port 8000 --model-name demo",
                    details=_SERVE_HELP)
    serve.add_argument("target", metavar="TARGET", help=_TARGET_HELP)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--model-name", help="the model id clients send (default: TARGET as given)")
    serve.add_argument("--api-key", default=os.environ.get("SFT_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on every request (default: $SFT_API_KEY; "
                       "the environment variable keeps the key out of the process list)")
    _add_overrides(serve)

    merge = command("merge", _merge, "merge a run's LoRA adapter into its base model",
                    "sft merge outputs/demo\n"
                    "sft merge outputs/demo --dtype bf16 --out outputs/demo-bf16 --force")
    merge.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (or a checkpoint)")
    merge.add_argument("--out", help="where to write the merged model (default: RUN_DIR/merged)")
    merge.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                       help="dtype of the merged weights (default: the base model's own)")
    merge.add_argument("--force", action="store_true", help="replace an existing merged model at --out")

    report = command("report", _report, "re-render a run's report.html, loss.png and model card",
                     "sft report outputs/demo")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir")

    export = command("export", _export, "write a run as one GGUF file (llama.cpp, Ollama) and an Ollama Modelfile",
                     "sft export outputs/demo\nsft export outputs/demo --dtype f16 --out demo-f16.gguf --force")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (or a checkpoint, or a model folder)")
    export.add_argument("--format", choices=["gguf"], default="gguf", help="file format (gguf)")
    export.add_argument("--dtype", default="q8_0", help="weight type: f32, f16, bf16, q8_0 (default) or q4_1, "
                        "the 4-bit type (the gguf package cannot write q4_k_m; q4_1 is the best 4-bit type it can)")
    export.add_argument("--out", metavar="FILE", help="the .gguf file to write (default: RUN_DIR/model.gguf)")
    export.add_argument("--force", action="store_true", help="replace an existing file and Modelfile")

    init = command("init", _init, "write a commented starter config (refuses to overwrite a file)",
                   "sft init my.yaml --format chat\n"
                   "sft init alpaca.yaml --format alpaca --model HuggingFaceTB/SmolLM2-135M-Instruct")
    init.add_argument("path", metavar="PATH", nargs="?", default="sft.yaml", help="where (default sft.yaml)")
    init.add_argument("--format", choices=["chat", "alpaca", "completion"], default="chat",
                      help="the training data's format (default chat)")
    init.add_argument("--model", help="the base model: a Hub id, a model folder or a .gguf file")

    config = command("config", _config, "print every setting with its default and help, or a config's values",
                     "sft config --defaults\nsft config my.yaml --set batch_size=16")
    config.add_argument("config", metavar="CONFIG", nargs="?", help="a YAML config: print its effective values")
    config.add_argument("--defaults", action="store_true", help="every setting, its default and one-line help")
    _add_overrides(config)

    templates = command("templates", _templates, "list the prompt templates, each with a one-line rendering",
                        "sft templates\nsft templates --model outputs/demo/merged")
    templates.add_argument("--model", help="render with this model's tokenizer (and show its chat template)")
    return parser


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config setting (YAML value; dotted keys for sections), repeatable",
    )


def _add_no_cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-cache", action="store_true",
                        help="tokenize the data again instead of using the tokenized-data cache")


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", help="a system message")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=256, help="reply length limit (256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1.0)")
    _add_overrides(parser)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# ---------------------------------------------------------------------------------------------- commands


def _train(args: argparse.Namespace) -> int:
    from app.sft.generation import RUN_CONFIG_FILE
    from app.sft.trainer import SFTTrainer

    overrides = [*args.overrides, "allow_data_change=true"] if args.allow_data_change else args.overrides
    config = _load_config(args.config, overrides, no_cache=args.no_cache)
    trainer = SFTTrainer(config)
    summary = trainer.train(resume_from_checkpoint=args.resume, continue_after_stop=args.continue_after_stop,
                            overwrite=True if args.overwrite else None)
    interrupted = summary["stop_reason"] == "signal"
    if not trainer.is_main_process:
        return 130 if interrupted else 0
    if interrupted:
        print(f"Stopped at step {summary['global_step']}; a checkpoint was saved. Continue with:\n"
              f"  sft train {args.config} --resume")
        return 130
    out = summary["output_dir"]  # the trainer wrote the model card with the other outputs
    best, name = summary.get("best_metric"), summary.get("best_metric_name")
    print(f"Trained {summary['global_step']} steps in {summary['runtime_s']:.1f} s "
          f"({summary['stop_reason']}): train loss {_fmt(summary['train_loss'])}"
          + (f", best {name} {best:.4f} at step {summary['best_step']}" if best is not None else ""))
    print(f"Outputs in {out}: the trained weights, {RUN_CONFIG_FILE}, metrics.jsonl, report.html, README.md")
    print(f"Next: sft eval {out} | sft chat {out} | sft merge {out}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from app.sft.audit import enforce_audit, run_audit
    from app.sft.data.batching import epoch_batches
    from app.sft.data.formatting import resolve_template
    from app.sft.data.splitting import build_datasets
    from app.sft.hardware import resolve_for_hardware
    from app.sft.modeling import load_tokenizer

    config = _load_config(args.config, args.overrides, no_cache=args.no_cache)
    resolve_for_hardware(config)  # warns about settings this machine would change, refuses impossible ones
    tokenizer = load_tokenizer(config)
    template = resolve_template(config, tokenizer)
    train, val = build_datasets(config, tokenizer)
    audit = run_audit(train, val, config, tokenizer, enforce=False)  # shown first, then enforced
    if args.json:
        print(audit.to_json())
        enforce_audit(audit)
        return 0
    template_name = template.name if template is not None else "none (plain text)"
    print(f"Config {args.config}: OK ({config.dataset_format} data, template {template_name}, "
          f"max_seq_length {config.max_seq_length})")
    print(f"Tokenizer of {config.base_model}: {len(tokenizer):,} tokens")
    print_data_stats("train", _data_source(config), train)
    if val is None:
        print("validation: none (set eval_dataset_name or validation_split to validate during training)")
    elif config.eval_dataset_name is not None:
        print_data_stats("validation", config.eval_dataset_name, val)
    else:
        print(f"validation: {len(val)} examples split off the training data (validation_split "
              f"{config.validation_split})")
    print(f"Token lengths of the training examples (max_seq_length {config.max_seq_length}):")
    for line in histogram(train.lengths):
        print(f"  {line}")
    budget = config.batch_size * config.max_seq_length if config.packing else None
    micro_batches = len(epoch_batches(train.lengths, batch_size=config.batch_size, epoch=0, seed=config.seed,
                                      token_budget=budget))
    per_epoch = math.ceil(micro_batches / config.gradient_accumulation_steps)
    total = f"{config.max_steps} (max_steps)" if config.max_steps else f"{per_epoch * config.num_epochs}"
    print(f"Optimizer steps: {per_epoch} per epoch on one process; this run: {total}")
    print(audit.format_table())
    enforce_audit(audit)  # audit: error -> exit 2 naming the failed checks; warn -> one warning
    return 0


def _preview(args: argparse.Namespace) -> int:
    from app.sft.audit import label_spans
    from app.sft.data.formatting import resolve_template
    from app.sft.data.loading import load_rows, map_columns
    from app.sft.data.tokenizing import tokenize_example
    from app.sft.loss import IGNORE_INDEX
    from app.sft.modeling import load_tokenizer

    config = _load_config(args.config, args.overrides)
    source = config.datasets[0] if config.dataset_name is None else None  # `datasets:`: its first source
    if source is not None:
        config = config.model_copy(update={"dataset_name": source.path, "dataset_split": source.split,
                                           "dataset_format": source.format or config.dataset_format})
    tokenizer = load_tokenizer(config)
    template = resolve_template(config, tokenizer)
    rows = load_rows(config.dataset_name, config.dataset_split)
    if source is not None:
        rows = map_columns(rows, source.columns, config.dataset_format, config.dataset_text_field,
                           f"datasets[0] ({source.path})")
    color = sys.stdout.isatty()
    marked = f"{_COLOR_START}like this{_COLOR_END}" if color else f"{_MARK_START}like this{_MARK_END}"
    print(f"Trained tokens (the ones the loss is computed on) are marked {marked}; a row longer than "
          f"max_seq_length ({config.max_seq_length}) ends with a {_CUT_MARK} line.")
    limit = config.max_seq_length
    for index in range(min(args.num_examples, len(rows))):
        whole = tokenize_example(  # untruncated, to show what max_seq_length cuts
            rows[index],
            tokenizer,
            dataset_format=config.dataset_format,
            template=template,
            max_seq_length=1 << 62,
            train_on_inputs=config.train_on_inputs,
            text_field=config.dataset_text_field,
        )
        ids, labels = (whole["input_ids"], whole["labels"]) if whole is not None else ([], [])
        cut_tokens = max(len(ids) - limit, 0)
        cut_trained = sum(label != IGNORE_INDEX for label in labels[limit:])
        cut = (f"; truncated: max_seq_length cuts {cut_tokens} more tokens, {cut_trained} of them trained"
               if cut_tokens else "")
        print(f"\n--- {config.dataset_name} row {index + 1}", end="")
        trained = sum(label != IGNORE_INDEX for label in labels[1:limit])
        if not trained:
            reason = "its response is cut away by max_seq_length" if cut_trained else "nothing to train on"
            print(f": dropped ({reason}{cut}) ---")
            continue
        print(f": {min(len(ids), limit)} tokens, {trained} trained{cut} ---")
        spans = label_spans(tokenizer, ids[:limit], labels[:limit])
        print("".join(_mark(text, color) if is_trained else text for text, is_trained in spans))
        if cut_tokens:
            print(f"{_CUT_MARK} truncated here by max_seq_length={limit}: {cut_tokens} tokens "
                  f"({cut_trained} trained) are not seen in training")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from app.sft.config import ConfigError
    from app.sft.data.splitting import build_datasets
    from app.sft.generation import evaluate_loss, load_run_config, load_trained_model
    from app.sft.modeling import load_tokenizer


    if args.generate:
        from app.sft.callbacks.generation_eval import evaluate_by_generation

        metrics = [name.strip() for name in args.metrics.split(",") if name.strip()] if args.metrics else None
        results, samples = evaluate_by_generation(args.target, args.overrides, metrics=metrics,
                                                  num_samples=args.num_samples)
        if is_main_process():
            print(f"{args.target}: " + "  ".join(f"{key} {value:.4f}" for key, value in results.items()))
            print(f"samples: {samples}")
        return 0
    if args.metrics or args.num_samples:
        raise ConfigError("--metrics and -n go with --generate")
    config = load_run_config(args.target, _with_no_cache(args.overrides, args.no_cache))
    tokenizer = load_tokenizer(config)
    _, val = build_datasets(config, tokenizer)
    if val is None:
        raise ConfigError(
            "no validation data: set eval_dataset_name, or validation_split > 0 "
            "(e.g. --set validation_split=0.1)"
        )
    model = load_trained_model(args.target, config)
    batch_size = config.eval_batch_size or config.batch_size
    loss, tokens = evaluate_loss(model, val, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size)
    if is_main_process():
        print(f"{args.target}: val_loss {loss:.4f}  perplexity {math.exp(min(loss, 100.0)):.3f}  "
              f"({len(val)} examples, {tokens:,} trained tokens)")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from app.sft.generation import Generator
    from app.sft.progress import phase

    generator = Generator.load(args.target, args.overrides)
    prompt: list[Message] | str
    if generator.is_chat:
        user: dict[str, str] = {"role": "user", "content": args.prompt}
        if args.input:
            user["input"] = args.input
        prompt = _with_system(args.system, [user])
    else:
        prompt = args.prompt
    with phase("Generating"):
        reply = generator.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_p=args.top_p)
    if is_main_process():
        print(reply)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from app.sft.config import ConfigError
    from app.sft.generation import Generator

    generator = Generator.load(args.target, args.overrides)
    if not generator.is_chat:
        raise ConfigError(f"{args.target}: chat needs a model trained on alpaca or chat data, not plain text")
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {args.target} (template {generator.template.name}). "
              "/help lists the commands, /exit or Ctrl-D ends.", file=sys.stderr)
    system = args.system
    history = _with_system(system, [])
    budget = max(generator.config.max_seq_length - args.max_new_tokens, 1)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        text = line.strip()
        if not line or text == "/exit":
            return 0
        if not text:
            continue
        if text.startswith("/"):
            name, _, rest = text.partition(" ")
            if name == "/help":
                print(_CHAT_HELP, flush=True)
            elif name == "/reset":
                history = _with_system(system, [])
                print("(conversation reset)", flush=True)
            elif name == "/system":
                system = rest.strip() or None
                history = _with_system(system, [])
                print(f"(system message set: {system}; conversation reset)" if system
                      else "(system message removed; conversation reset)", flush=True)
            else:
                print(f"unknown command {name}; /help lists the commands (nothing was sent to the model)",
                      file=sys.stderr, flush=True)
            continue
        history.append({"role": "user", "content": text})
        _drop_oldest_turns(generator, history, budget)
        print("assistant> ", end="", flush=True)
        reply = generator.generate(history, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_p=args.top_p, on_text=_write_stdout)
        print(flush=True)
        history.append({"role": "assistant", "content": reply})


def _serve(args: argparse.Namespace) -> int:
    from app.sft.config import ConfigError
    from app.sft.generation import Generator

    try:
        from app.sft.serve import create_app, serve
    except ImportError as error:
        raise ConfigError(f"sft serve needs FastAPI and uvicorn: pip install 'llm-playground-sft[serve]' "
                          f"({error})") from None
    generator = Generator.load(args.target, args.overrides)
    name = args.model_name or args.target.rstrip("/")
    app = create_app(generator, model_name=name, api_key=args.api_key or None)
    where = f"http://{args.host}:{args.port}/v1"
    print(f"Serving {name!r} (template {generator.template.name}) at {where}"
          f"{' (API key required)' if args.api_key else ''}; Ctrl-C or SIGTERM stops", file=sys.stderr, flush=True)
    serve(app, host=args.host, port=args.port)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from app.sft.config import ConfigError
    from app.sft.generation import load_run_config
    from app.sft.modeling import merge_lora

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "merged"
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        where = "the current directory" if out.resolve() == cwd else f"a parent of the current directory {cwd}"
        raise ConfigError(f"--out: {args.out!r} is {where}; a merge is written into a folder of its own, e.g. "
                          f"--out {run_dir / 'merged'}")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it (or --out DIR)")
    config = load_run_config(run_dir)
    merged = merge_lora(run_dir, out, base_model=config.base_model, dtype=args.dtype or "auto",
                        overwrite=args.force)
    config.to_yaml(Path(merged) / "config.yaml")  # so `sft chat DIR` renders prompts as the run trained
    print(f"Merged model written to {merged}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from app.sft.export import export_gguf

    out = export_gguf(args.run_dir, args.out, dtype=args.dtype, force=args.force)
    print(f"Wrote {out} ({args.dtype}, {out.stat().st_size / 1e6:.1f} MB) and {out.parent / 'Modelfile'}")
    print(f"Run it: llama-cli -m {out} -cnv | ollama create my-model -f {out.parent / 'Modelfile'} | sft chat {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from app.sft.model_card import CARD_FILE, write_model_card
    from app.sft.report import ReportError, render_report

    png, html = render_report(args.run_dir)
    written = [html, png]
    if (Path(args.run_dir) / "training_summary.json").is_file():
        try:
            written.append(write_model_card(args.run_dir))
        except OSError as error:
            raise ReportError(f"{Path(args.run_dir) / CARD_FILE}: cannot write the model card "
                              f"({error.strerror or error})") from error
    print(f"Wrote {', '.join(str(path) for path in written)}")
    return 0


def _init(args: argparse.Namespace) -> int:
    from app.sft.starter import write_starter_config

    path = write_starter_config(args.path, dataset_format=args.format, base_model=args.model)
    print(f"Wrote {path}. Edit base_model and dataset_name, then: sft validate {path} && sft train {path}")
    return 0


def _config(args: argparse.Namespace) -> int:
    from app.sft.aliases import ALIASES
    from app.sft.config import ConfigError, describe_fields

    if args.defaults:
        for name, default, help_ in describe_fields():
            print(f"{name}: {default}" + (f"  # {help_}" if help_ else ""))
        print("# Also accepted, other tools' names for these settings:")
        for alias, target in ALIASES.items():
            print(f"#   {alias} -> {target.field} ({target.note})")
        return 0
    if args.config is None:
        raise ConfigError("give a CONFIG to print its values, or --defaults for every setting")
    import yaml

    config = _load_config(args.config, args.overrides, need_data=False)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0


def _templates(args: argparse.Namespace) -> int:
    from app.sft.templates import describe_templates

    tokenizer = None
    if args.model:
        from app.sft.modeling import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    for name, rendering in describe_templates(tokenizer):
        print(f"{name:<10} {rendering}")
    return 0


# ---------------------------------------------------------------------------------------------- helpers


def _load_config(path: str, overrides: Sequence[str], *, no_cache: bool = False,
                 need_data: bool = True) -> SFTConfig:
    """A YAML config with `--set` overrides (and `--no-cache`) that names its training data."""
    from app.sft.config import ConfigError, SFTConfig

    config = SFTConfig.from_yaml(path)
    overrides = _with_no_cache(overrides, no_cache)
    if overrides:
        config = config.with_overrides(list(overrides))
    if need_data and config.dataset_name is None and not config.datasets:
        raise ConfigError(f"{path}: dataset_name: required setting is missing (the training data; or give "
                          "a list of sources as datasets)")
    return config


def _with_no_cache(overrides: Sequence[str], no_cache: bool) -> list[str]:
    return [*overrides, "cache_tokenized=false"] if no_cache else list(overrides)


def _data_source(config: SFTConfig) -> str:
    if config.dataset_name is not None:
        return config.dataset_name
    return " + ".join(source.path for source in config.datasets)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llm-playground-sft")
    except PackageNotFoundError:  # run from a source checkout that was never installed
        from app.sft import __version__

        return __version__


def _usage_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that mean "bad input" (see `_USAGE_ERROR_CLASSES`)."""
    found: list[type[BaseException]] = [FileNotFoundError, FileExistsError]
    for module_name, class_name in _USAGE_ERROR_CLASSES:
        module = sys.modules.get(module_name)
        if module is not None:
            found.append(getattr(module, class_name))
    return tuple(found)


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _with_system(system: str | None, messages: list[Message]) -> list[Message]:
    return [{"role": "system", "content": system}, *messages] if system else messages


def _drop_oldest_turns(generator: Generator, history: list[Message], budget: int) -> None:
    """Forget the oldest exchanges while the prompt is over `budget` tokens (the last message stays)."""
    first = 1 if history[0]["role"] == "system" else 0
    while len(history) - first > 1 and generator.prompt_length(history) > budget:
        del history[first : first + 2]


def _mark(text: str, color: bool) -> str:
    if color:  # colour each line separately, so a terminal never carries it across a line break
        return "\n".join(f"{_COLOR_START}{line}{_COLOR_END}" if line else line for line in text.split("\n"))
    return f"{_MARK_START}{text}{_MARK_END}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _message(error: BaseException) -> str:
    """The error's message; FileNotFoundError from open() has it in `strerror` and `filename`."""
    if isinstance(error, FileNotFoundError) and error.filename:
        return f"{error.strerror}: {error.filename}"
    return str(error)
