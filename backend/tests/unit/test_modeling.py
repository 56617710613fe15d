"""Model loading (HF dir, GGUF), LoRA, saving and merging, on a tiny random Llama built here."""

import json
import os
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import PeftModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from app.sft.config import ConfigError, SFTConfig
from app.sft.modeling import (
    apply_lora,
    default_lora_target_modules,
    ensure_pad_token,
    gguf_cache_dir,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    merge_lora,
    resolve_dtype,
    resolve_model_source,
    save_final_model,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
N_HEADS, N_KV_HEADS = 4, 2


def make_config(base_model, **overrides) -> SFTConfig:
    """An SFTConfig with its defaults, built without validation so that the machine's hardware
    fallbacks (no CUDA here) do not rewrite the settings these tests exercise."""
    values = {"base_model": str(base_model), "lora_dropout": 0.0, **overrides}
    return SFTConfig.model_construct(**values)


def train_bpe() -> Tokenizer:
    """A byte-level BPE tokenizer (the SmolLM2/GPT-2 kind) trained on a few sentences."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(
        ["the quick brown fox jumps over the lazy dog", "hello world"] * 20, trainer
    )
    return tokenizer


def tiny_llama(vocab_size: int, tie_word_embeddings: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bpe) -> Path:
    """A tiny Llama + tokenizer (no pad token) saved in Hugging Face format."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(bpe.get_vocab_size()).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>").save_pretrained(path)
    return path


@pytest.fixture
def ids(model_dir) -> torch.Tensor:
    tokenizer = load_tokenizer(str(model_dir))
    return torch.tensor([tokenizer("hello world, the quick fox").input_ids])


@pytest.fixture(autouse=True)
def gguf_cache(tmp_path, monkeypatch) -> Path:
    """Each test converts GGUF files into its own cache, never into ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLM_PLAYGROUND_CACHE", str(cache))
    return cache


def lora_model(model_dir, **overrides):
    config = make_config(model_dir, **overrides)
    return apply_lora(load_model(config), config)


def randomize_lora(model: PeftModel) -> None:
    """LoRA's B matrices start at zero (a no-op adapter); give them values as training would."""
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# --- resolving base_model ---------------------------------------------------------------------------


def test_local_dir_resolves_to_absolute_path_and_loads_the_saved_weights(model_dir, ids, monkeypatch):
    monkeypatch.chdir(model_dir.parent)
    source = resolve_model_source(model_dir.name)
    assert (source.kind, source.path_or_id, source.gguf_file) == ("local", str(model_dir), None)

    model, tokenizer = load_model_and_tokenizer(make_config(model_dir.name))
    expected = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.dtype == torch.float32
    assert torch.equal(logits(model, ids), logits(expected, ids))
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_hub_id_is_recognised_without_touching_the_network():
    source = resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (source.kind, source.path_or_id, source.gguf_file) == (
        "hub",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        None,
    )


def test_dir_without_config_json_names_the_dir_and_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*config\.json"):
        resolve_model_source(str(tmp_path))


def test_adapter_dir_as_base_model_says_it_is_an_adapter(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="LoRA adapter"):
        resolve_model_source(str(tmp_path))


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/dir", "outputs/run1/merged", "~/nope/x"])
def test_missing_path_is_reported_instead_of_a_hub_error(name):
    with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
        resolve_model_source(name)


def test_missing_gguf_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*missing\.gguf"):
        resolve_model_source(str(tmp_path / "missing.gguf"))


def test_file_that_is_not_gguf_is_rejected(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"model\.bin is a file but not a \.gguf"):
        resolve_model_source(str(path))


# --- tokenizer and dtype ---------------------------------------------------------------------------


def test_pad_token_is_set_when_missing_preferring_unk_then_eos(bpe):
    with_unk = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    ensure_pad_token(with_unk)
    assert with_unk.pad_token == "<|endoftext|>"

    eos_only = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>")
    ensure_pad_token(eos_only)
    assert eos_only.pad_token == "<|im_end|>"

    nothing = PreTrainedTokenizerFast(tokenizer_object=bpe)
    with pytest.raises(ValueError, match="no pad, unk or eos"):
        ensure_pad_token(nothing)


def test_dedicated_pad_token_in_the_vocabulary_is_preferred(bpe):
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    tokenizer.add_tokens(["<pad>"])
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "<pad>"


def test_loaded_tokenizer_pads_on_the_right(model_dir):
    tokenizer = load_tokenizer(str(model_dir))
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.padding_side == "right"
    batch = tokenizer(["hello", "hello world the fox"], padding=True)
    assert batch["attention_mask"][0][-1] == 0 and batch["attention_mask"][0][0] == 1


@pytest.mark.parametrize(
    ("overrides", "device", "expected"),
    [
        ({"mixed_precision": "bf16"}, "cuda", torch.bfloat16),
        ({"mixed_precision": "fp16"}, "cuda:0", torch.float16),
        ({"mixed_precision": "bf16"}, "cpu", torch.float32),
        ({"mixed_precision": "bf16", "use_lora": False}, "cuda", torch.float32),
        ({"mixed_precision": None}, "cuda", torch.float32),
        ({"mixed_precision": "bf16", "dtype": "float32"}, "cuda", torch.float32),
        ({"dtype": "bfloat16"}, "cpu", torch.bfloat16),
    ],
)
def test_dtype_rule(overrides, device, expected):
    assert resolve_dtype(make_config("x", **overrides), device) == expected


def test_explicit_dtype_is_used_when_loading(model_dir):
    assert load_model(make_config(model_dir, dtype="bfloat16")).dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_qlora_without_cuda_fails_clearly(model_dir):
    with pytest.raises(RuntimeError, match="use_qlora needs a CUDA GPU"):
        load_model(make_config(model_dir, use_qlora=True))


# --- LoRA -------------------------------------------------------------------------------------------


def test_default_lora_targets_are_the_projections_not_the_head(model_dir):
    base = load_model(make_config(model_dir))
    assert default_lora_target_modules(base) == PROJECTIONS
    untied = tiny_llama(64, tie_word_embeddings=False)
    assert default_lora_target_modules(untied) == PROJECTIONS

    model = apply_lora(base, make_config(model_dir))
    assert isinstance(model, PeftModel)
    wrapped = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(PROJECTIONS)
    assert not hasattr(model.get_output_embeddings(), "lora_A")


def test_only_lora_parameters_train_and_wrapping_warns_of_nothing(model_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. peft's use of a property transformers 5 deprecates
        model = lora_model(model_dir)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # 2 layers x 7 projections x (A, B)
    assert len(trainable) == 2 * len(PROJECTIONS) * 2


def test_explicit_lora_target_modules_are_used(model_dir):
    model = lora_model(model_dir, lora_target_modules=["q_proj", "v_proj"])
    wrapped = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "v_proj"}


def test_full_fine_tuning_trains_every_parameter(model_dir):
    model = lora_model(model_dir, use_lora=False)
    assert not isinstance(model, PeftModel)
    assert all(p.requires_grad for p in model.parameters())


def test_gradient_checkpointing_gives_the_same_lora_gradients(model_dir, ids):
    def lora_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # same LoRA A initialisation in both runs
        model = lora_model(model_dir, gradient_checkpointing=checkpointing)
        randomize_lora(model)
        model.train()
        model(ids, labels=ids).loss.backward()
        assert model.base_model.model.is_activation_checkpointing == checkpointing
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = lora_grads(False), lora_grads(True)
    assert set(plain) == set(checkpointed)
    for name, grad in checkpointed.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, plain[name], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_turns_off_the_kv_cache(model_dir):
    model = lora_model(model_dir, gradient_checkpointing=True)
    assert model.config.use_cache is False


# --- saving and merging ---------------------------------------------------------------------------


def test_saved_adapter_reloads_with_peft_to_identical_outputs(model_dir, ids, tmp_path):
    model = lora_model(model_dir)
    randomize_lora(model)
    out = save_final_model(model, load_tokenizer(str(model_dir)), tmp_path / "final")

    files = set(os.listdir(out))
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


def test_full_model_is_saved_whole(model_dir, ids, tmp_path):
    model = lora_model(model_dir, use_lora=False)
    out = save_final_model(model, load_tokenizer(str(model_dir)), tmp_path / "final")
    assert "model.safetensors" in os.listdir(out)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), ids), logits(model, ids))


def test_merged_model_matches_the_adapter_model(model_dir, ids, tmp_path):
    model = lora_model(model_dir)
    randomize_lora(model)
    adapter_dir = save_final_model(model, load_tokenizer(str(model_dir)), tmp_path / "final")
    expected = logits(model, ids)

    merged_dir = merge_lora(adapter_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert "model.safetensors" in os.listdir(merged_dir)
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=0)
    assert load_tokenizer(merged_dir).pad_token == "<|im_end|>"

    # Merging the in-memory model gives the same result and leaves that model usable.
    merge_lora(model, tmp_path / "merged-from-model")
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged-from-model"), ids),
        expected,
        atol=1e-5,
        rtol=0,
    )
    assert torch.equal(logits(model, ids), expected)


def test_merge_needs_an_adapter_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*adapter_config\.json"):
        merge_lora(tmp_path, tmp_path / "merged")


# --- GGUF -------------------------------------------------------------------------------------------


def write_tiny_gguf(path: Path, model: LlamaForCausalLM, bpe: Tokenizer) -> None:
    """Write `model` and `bpe` as an F32 GGUF the way llama.cpp's converter lays them out."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_KV_HEADS)
    writer.add_rope_dimension_count(config.hidden_size // N_HEADS)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = bpe.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges([" ".join(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]])
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_chat_template(CHAT_TEMPLATE)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.numpy().astype(np.float32)
        heads = {"q_proj": N_HEADS, "k_proj": N_KV_HEADS}.get(name.split(".")[-2])
        if heads:  # llama.cpp interleaves the rotary halves of each head
            array = array.reshape(heads, 2, -1, array.shape[1]).swapaxes(1, 2).reshape(array.shape)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def gguf_file(tmp_path, bpe) -> tuple[Path, LlamaForCausalLM]:
    model = tiny_llama(bpe.get_vocab_size())
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, model, bpe)
    return path, model


def test_gguf_loads_once_converted_and_cached(gguf_file, gguf_cache):
    path, original = gguf_file
    source = resolve_model_source(str(path))
    assert (source.kind, source.path_or_id, source.gguf_file) == ("gguf", str(path.parent), "tiny.gguf")

    model, tokenizer = load_model_and_tokenizer(make_config(path))
    cached = gguf_cache_dir(path)
    assert cached.parent == gguf_cache / "gguf" and cached.name.startswith("tiny-")
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(os.listdir(cached))
    assert model.name_or_path == str(path)  # the name the user gave, not the cache path (portable outputs)
    assert getattr(model, "hf_quantizer", None) is None

    ids = torch.tensor([tokenizer("hello world, the quick fox").input_ids])
    torch.testing.assert_close(logits(model, ids), logits(original, ids), atol=1e-5, rtol=0)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None

    weights = cached / "model.safetensors"
    written = weights.stat().st_mtime_ns
    load_model_and_tokenizer(make_config(path))
    assert weights.stat().st_mtime_ns == written
    assert os.listdir(gguf_cache / "gguf") == [cached.name]

    os.utime(path, ns=(written + 10**9, written + 10**9))  # the file was replaced: convert again
    assert gguf_cache_dir(path) != cached


def test_tokenizer_of_an_unconverted_gguf_matches_the_cached_one(gguf_file, gguf_cache):
    path, _ = gguf_file
    direct = load_tokenizer(str(path))
    assert not (gguf_cache / "gguf").exists()  # reading the tokenizer converts nothing
    load_model(make_config(path))
    cached = load_tokenizer(str(path))
    text = "<|im_start|>user\nthe lazy dog<|im_end|>"
    assert direct(text).input_ids == cached(text).input_ids
    assert direct.chat_template == cached.chat_template == CHAT_TEMPLATE
    assert direct.pad_token == cached.pad_token


def test_lora_on_a_gguf_base_merges_offline(gguf_file, tmp_path):
    path, _ = gguf_file
    config = make_config(path)
    model, tokenizer = load_model_and_tokenizer(config)
    model = apply_lora(model, config)
    randomize_lora(model)
    adapter_dir = save_final_model(model, tokenizer, tmp_path / "final")
    recorded = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(path)  # the GGUF file as named, never its conversion cache; merging resolves it again

    merged = AutoModelForCausalLM.from_pretrained(merge_lora(adapter_dir, tmp_path / "merged"))
    ids = torch.tensor([tokenizer("the quick brown fox").input_ids])
    torch.testing.assert_close(logits(merged, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_package_uri_names_a_file_inside_an_installed_package():
    import importlib.util

    from app.sft.modeling import package_file

    json_dir = Path(next(iter(importlib.util.find_spec("json").submodule_search_locations)))
    assert package_file("package://json/decoder.py") == json_dir / "decoder.py"
    with pytest.raises(FileNotFoundError, match="no installed Python package 'not_a_package_xyz'"):
        resolve_model_source("package://not_a_package_xyz/model.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_source("package://json/missing.gguf")


# ---------------------------------------------------------------------------------------------- Hub kernels


def test_every_model_load_says_use_kernels_explicitly_and_off_by_default(model_dir, monkeypatch):
    """transformers 5 turns Hub kernels on by default on CUDA (a download at load time). Every load of ours names
    `use_kernels`: off unless the config asks for them."""
    from transformers import PreTrainedModel

    from app.sft.generation import load_trained_model

    original = PreTrainedModel.from_pretrained.__func__
    calls: list[dict] = []

    def recording(cls, *args, **kwargs):
        calls.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(recording))
    config = SFTConfig(base_model=str(model_dir), dataset_name="unused.jsonl")
    load_model(config)
    load_trained_model(model_dir, config)  # a model folder, loaded for generation
    assert len(calls) == 2
    assert all(call.get("use_kernels") is False for call in calls), calls


def test_no_module_loads_a_model_around_the_explicit_use_kernels_choice():
    """One place (`modeling.pretrained_causal_lm`) calls `AutoModelForCausalLM.from_pretrained` (or any other
    `...ForCausalLM.from_pretrained`)."""
    import ast

    package = Path(__file__).resolve().parents[2] / "app"
    callers = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id.endswith("ForCausalLM")):
                owner = next(f.name for f in functions if f.lineno <= node.lineno <= f.end_lineno)
                callers.append(f"{path.relative_to(package)}:{owner}")
    assert callers == ["sft/modeling.py:pretrained_causal_lm"]
