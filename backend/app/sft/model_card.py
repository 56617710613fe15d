"""The model card (`README.md` in a run's output_dir): what the run was and how to load its result.

Written from the run's own files: `config.yaml` (base model, data, template, LoRA settings),
`training_summary.json` (steps, final and best losses) and `adapter_config.json` (whether it is an adapter).
It replaces peft's empty template; the YAML header keeps the fields the Hugging Face Hub reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from app.sft.atomic import write_text

CARD_FILE = "README.md"


def render_model_card(run_dir: str | Path) -> str:
    """The card's Markdown text for the finished run in `run_dir`."""
    run = Path(run_dir)
    config = _read_yaml(run / "config.yaml")
    summary = _read_json(run / "training_summary.json")
    is_adapter = (run / "adapter_config.json").is_file()
    base = str(config.get("base_model", "unknown"))
    data_format = config.get("dataset_format", "alpaca")
    template = config.get("template_name") or ("none (plain text)" if data_format == "completion" else
                                               f"the default for {data_format} data")
    sources = [config["dataset_name"]] if config.get("dataset_name") else [
        f"{entry['path']} (weight {entry.get('weight', 1.0)})" for entry in config.get("datasets") or []
    ]
    header = {
        "base_model": base,
        "library_name": "peft" if is_adapter else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["llm-playground-sft", "lora" if is_adapter else "full-fine-tune"],
    }
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {config.get('run_name') or run.name}",
        "",
        f"{'A LoRA adapter for' if is_adapter else 'A full fine-tune of'} `{base}`, trained with "
        "llm-playground-sft (supervised fine-tuning).",
        "",
        "## Training",
        "",
        f"- Base model: `{base}`",
        f"- Data: {', '.join(f'`{source}`' for source in sources) or 'given in Python'} ({data_format} format)",
        f"- Validation data: `{config['eval_dataset_name']}`" if config.get("eval_dataset_name")
        else f"- Validation data: {config.get('validation_split', 0)} of the training examples held out",
        f"- Prompt template: {template}; max_seq_length {config.get('max_seq_length')}; "
        f"train_on_inputs {config.get('train_on_inputs', False)}",
    ]
    if is_adapter:
        targets = config.get("lora_target_modules") or "every linear projection except the output head"
        lines.append(f"- LoRA: r {config.get('lora_r')}, alpha {config.get('lora_alpha')}, dropout "
                     f"{config.get('lora_dropout')}, target modules {targets}"
                     + "".join(f", {name}" for name in ("use_dora", "use_rslora") if config.get(name))
                     + (" (QLoRA, 4-bit base)" if config.get("use_qlora") else ""))
        if config.get("neftune_noise_alpha"):
            lines.append(f"- NEFTune noise alpha {config['neftune_noise_alpha']} on the input embeddings")
    lines += [
        f"- Optimisation: learning rate {config.get('learning_rate')} ({config.get('scheduler_type')}), "
        f"batch size {config.get('batch_size')} x {config.get('gradient_accumulation_steps')} accumulation, "
        f"seed {config.get('seed')}",
        "",
        "## Results",
        "",
        f"- Steps: {summary.get('global_step', 'n/a')} (epochs {_number(summary.get('epochs'))}, stopped by "
        f"{summary.get('stop_reason', 'n/a')}), {summary.get('train_tokens', 'n/a')} trained tokens",
        f"- Final train loss: {_number(summary.get('train_loss'))}",
        f"- Best validation loss: {_number(summary.get('best_val_loss'))}"
        + (f" at step {summary['best_step']}" if summary.get("best_step") is not None else ""),
        "",
        "## How to load it",
        "",
        "```bash",
        f"sft chat {run}",
        f'sft generate {run} --prompt "..."',
    ]
    if is_adapter:
        lines += [f"sft merge {run}            # a standalone model in {run / 'merged'}", "```", "", "```python",
                  "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{run}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{run}")', "```"]
        if base.startswith("package://") or base.endswith(".gguf"):
            lines += ["", f"The base `{base}` is a GGUF file; peft alone cannot load it: use `sft` (which converts "
                      "it once and caches the result) or `sft merge`."]
    else:
        lines += ["```", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{run}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{run}")', "```"]
    return "\n".join(lines) + "\n"


def write_model_card(run_dir: str | Path) -> Path:
    """Write `render_model_card(run_dir)` to `run_dir/README.md` (replacing a link there, never writing
    through it) and return its path."""
    path = Path(run_dir) / CARD_FILE
    write_text(path, render_model_card(run_dir))
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "n/a" if value is None else str(value)
