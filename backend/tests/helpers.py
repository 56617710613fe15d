"""Builders shared by the test suite: a tiny tokenizer, a tiny random Llama, files on disk, W&B run logs.

Everything here is built locally (nothing is downloaded) and is deterministic, so tests stay fast and
reproducible. `conftest.py` exposes these builders as fixtures; import them directly when a fixture is
awkward (for example inside a subprocess script).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
"""The tiny tokenizer's end-of-sequence token; it also closes every ChatML turn, as in Qwen/SmolLM."""
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, IM_START_TOKEN, EOS_TOKEN)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""A ChatML chat template; assistant replies are wrapped in `{% generation %}` so
`apply_chat_template(..., return_assistant_tokens_mask=True)` can mark them."""

TINY_WORDS = tuple(
    """
    the a an and or of to in on at for with is are was be it this that what who how why when where
    you i we he she they my your our hello hi world yes no please thanks thank answer question
    capital city country france paris germany berlin italy rome spain madrid japan tokyo
    one two three four five six seven eight nine ten zero plus minus equals number
    cat dog bird fish red green blue big small good bad fast slow water fire sky sun moon
    write say tell give name list translate summarize explain count add repeat
    user assistant system instruction input response below above task request inst sys
    0 1 2 3 4 5 6 7 8 9 10
    . , ? ! : ; ' " ( ) [ ] [/ # ### - / = + * << >>
    """.split()
)
"""Words the tiny tokenizer knows (lower-cased text is split on whitespace and punctuation runs;
anything else becomes `<unk>`). Covers the alpaca (`###`), ChatML and llama2 (`[INST]`, `<<SYS>>`) markup."""

TINY_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(TINY_WORDS)


def build_tiny_tokenizer(
    extra_words: Iterable[str] = (), chat_template: str | None = CHATML_TEMPLATE
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over `TINY_WORDS` (+ `extra_words`), lower-casing its input.

    Ids: `<pad>`=0, `<unk>`=1, `<|im_start|>`=2, `<|im_end|>`=3 (the eos token), then the words.
    Pass `chat_template=None` for a tokenizer without a chat template.
    """
    words = list(dict.fromkeys([*TINY_WORDS, *(w.lower() for w in extra_words)]))
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN, eos_token=EOS_TOKEN
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_llama(vocab_size: int = TINY_VOCAB_SIZE, seed: int = 0, **config_overrides: Any) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama (hidden size 32, ~10k parameters plus embeddings).

    Initialisation is seeded without touching the global RNG, so the same `seed` gives the same weights.
    `config_overrides` go to `LlamaConfig` (e.g. `tie_word_embeddings=True`).
    """
    settings: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": 0,
        "eos_token_id": 3,
        "bos_token_id": None,
        "tie_word_embeddings": False,
    }
    settings.update(config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**settings))
    return model.eval()


def save_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny Llama and the tiny tokenizer to `directory` as a Hugging Face model folder."""
    directory = Path(directory)
    tiny_llama(seed=seed).save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    return directory


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write `rows` as JSON lines to `path` (parent folders are created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(dict(row)) + "\n" for row in rows), encoding="utf-8")
    return path


@dataclass
class WandbRunLog:
    """What an offline W&B run wrote, read back from its `run-<id>.wandb` file."""

    run_id: str = ""
    project: str = ""
    entity: str = ""
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: dict[int, dict[str, Any]] = field(default_factory=dict)
    """W&B step -> the metrics logged at that step (W&B's own `_step`, `_runtime`, ... keys removed)."""
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[tuple[str, str]] = field(default_factory=list)
    """(name, type) of each logged artifact."""
    exit_code: int | None = None
    """None when the run was never finished."""


def _wandb_log_records(path: Path) -> Iterable[bytes]:
    """The raw records of a `.wandb` file: a 7-byte header, then LevelDB-log framing in 32 KiB blocks."""
    data = path.read_bytes()
    block, header_size = 32 * 1024, 7
    pos, pending = header_size, b""
    while pos + header_size <= len(data):
        if block - pos % block < header_size:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + header_size])
        chunk = data[pos + header_size : pos + header_size + length]
        pos += header_size + length
        if kind == 1:  # full record
            yield chunk
        elif kind == 2:  # first fragment
            pending = chunk
        elif kind == 3:  # middle fragment
            pending += chunk
        elif kind == 4:  # last fragment
            yield pending + chunk
            pending = b""


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_wandb_run(run_dir: str | Path) -> WandbRunLog:
    """Parse an offline W&B run directory (`.../wandb/offline-run-<time>-<id>`) into a `WandbRunLog`.

    Call `wandb.teardown()` first (or use `read_wandb_runs`) so that the run is completely written.
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("run-*.wandb")
    log = WandbRunLog()
    for raw in _wandb_log_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            log.run_id, log.project, log.entity = run.run_id, run.project, run.entity
            log.name = run.display_name
            log.config.update({_item_key(i): json.loads(i.value_json) for i in run.config.update})
        elif kind == "config":
            log.config.update({_item_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            row = {_item_key(i): json.loads(i.value_json) for i in record.history.item}
            log.history.setdefault(int(row["_step"]), {}).update(
                {k: v for k, v in row.items() if not k.startswith("_")}
            )
        elif kind == "summary":
            log.summary.update({_item_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "artifact":
            log.artifacts.append((record.artifact.name, record.artifact.type))
        elif kind == "exit":
            log.exit_code = record.exit.exit_code
    log.config.pop("_wandb", None)
    return log


def wandb_offline_runs(wandb_dir: str | Path) -> list[Path]:
    """The offline run directories under `wandb_dir` (the `WANDB_DIR`), by start time (1 s resolution)."""
    return sorted(Path(wandb_dir).glob("wandb/offline-run-*"))


def read_wandb_runs(wandb_dir: str | Path) -> list[WandbRunLog]:
    """Every offline run under `wandb_dir`, read back after `wandb.teardown()` flushed all of them to disk.

    `run.finish()` returns before wandb's service process has written the last records, so reading without
    the teardown races with the writer.
    """
    import wandb

    wandb.teardown()
    return [read_wandb_run(run_dir) for run_dir in wandb_offline_runs(wandb_dir)]
