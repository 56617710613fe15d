"""Inference with a base model or a fine-tuned run: loading it, its validation loss, prompts in the training
format, greedy or sampled replies.

A model answers best when its prompt looks exactly like the training text up to the reply, so prompts are
rendered with the prompt template the run was trained with (`data.resolve_template`: the config's
`template_name`, or the default for its `dataset_format`).

    generator = Generator.load("outputs/demo")   # a run directory, a checkpoint, a config file, a model folder
    generator.generate([{"role": "user", "content": "Name three colours."}])   # (e.g. merged/), a Hub id, a .gguf

A target that carries no training config (a plain model folder, a Hub id, a `.gguf` file) is treated as a chat
model: prompts use the tokenizer's own chat template, or ChatML when it has none (`--set dataset_format=...`
and `template_name=...` choose otherwise).

Evaluation by generation (`GenerationEvalCallback`, `sft eval --generate`) uses the batched path:
`generation_prompts` renders evaluation rows as at training time up to where the answer starts, and
`generate_batch` answers a batch of them at once (left padding, KV cache, greedy at temperature 0, each row
stopping at its own EOS / turn terminator).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextStreamer,
)

from app.sft import checkpointing
from app.sft.config import SFTConfig
from app.sft.data.batching import PaddedCollator
from app.sft.data.formatting import prompt_and_reference, resolve_template
from app.sft.errors import ConfigError, DataError
from app.sft.loss import evaluation_totals
from app.sft.modeling import (
    ensure_pad_token,
    load_model,
    load_tokenizer,
    pretrained_causal_lm,
    quiet_peft_deprecations,
    read_adapter_config,
    read_gguf,
    refuse_non_finite_weights,
    refuse_pickled_weights,
)
from app.sft.progress import phase
from app.sft.templates import Message, PromptTemplate, Segment, TemplateError, chat_template_for, message_text
from app.sft.tokenized import TokenizedDataset

RUN_CONFIG_FILE = "config.yaml"
"""The config a finished run writes into its output directory."""

GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily (as vLLM does): logits divided by a tiny one overflow to inf/NaN."""


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""A model folder holding none of these has no tokenizer of its own."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
"""`org/name`: a Hugging Face Hub model id (a bare name such as `gpt2` is read as a local path)."""


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> SFTConfig:
    """The config of whatever names a model: a run directory (`config.yaml`), a checkpoint (`sft_config.json`),
    a YAML config file, a Hugging Face model folder, a LoRA adapter folder saved by peft alone (on the base model
    its adapter_config.json names), a Hub id (`org/name`) or a `.gguf` file.

    A model folder's own `config.yaml` (what `sft merge` writes into `merged/`) gives the data format and
    template, with `base_model` set to the folder itself; a target without one is a chat model (see the module
    docstring). `overrides` are `key=value` settings as for `sft train --set`. A path that is none of these
    raises `FileNotFoundError` saying what was expected.
    """
    text = str(path)
    path = Path(path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":  # prompted with its own chat template, if it has one
        data_format = "chat" if _gguf_has_chat_template(path) else "completion"
        config = SFTConfig(base_model=str(path), dataset_format=data_format)
    elif path.is_file():
        config = SFTConfig.from_yaml(path)
    elif (path / RUN_CONFIG_FILE).is_file():
        config = SFTConfig.from_yaml(path / RUN_CONFIG_FILE)
    elif (saved := checkpointing.read_config(path) if path.is_dir() else None) is not None:
        config = SFTConfig.from_dict(saved, source=str(path / checkpointing.CONFIG_FILE))
    elif _is_model_folder(path):
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise ConfigError(f"{path}: has model weights but no tokenizer (none of {', '.join(_TOKENIZER_FILES)}"
                              "); copy the tokenizer files of its base model into it")
        config = _bare_model_config(str(path))
    elif (path / "adapter_config.json").is_file():  # a LoRA adapter saved by peft itself (TRL, ...): on its base
        base_model = read_adapter_config(path).get("base_model_name_or_path")
        if not base_model:
            raise ConfigError(f"{path / 'adapter_config.json'}: base_model_name_or_path is missing (the base model)")
        config = _bare_model_config(base_model)
    elif not path.exists() and _HUB_ID.match(text) and ".." not in text:
        config = _bare_model_config(text)
    else:
        raise FileNotFoundError(
            f"{path}: holds no model: not a config file, a run directory (with {RUN_CONFIG_FILE}), a checkpoint "
            f"(with {checkpointing.CONFIG_FILE}), a Hugging Face model folder (with config.json), a LoRA adapter "
            "(with adapter_config.json), a .gguf file "
            "or a Hub id (org/name)"
        )
    if _is_model_folder(path) and (path / "tokenizer_config.json").is_file():  # its own weights and tokenizer
        config = config.model_copy(update={"base_model": str(path)})
    return config.with_overrides(list(overrides)) if overrides else config


def _gguf_has_chat_template(path: Path) -> bool:
    import gguf

    try:
        return gguf.GGUFReader(path).get_field(gguf.Keys.Tokenizer.CHAT_TEMPLATE) is not None
    except (ValueError, IndexError, OSError):  # not readable as GGUF here: loading it will say why
        return True


def _is_model_folder(path: Path) -> bool:
    """A folder of full model weights in Hugging Face format (not a LoRA adapter)."""
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()


def _bare_model_config(base_model: str) -> SFTConfig:
    """The config for a model that comes without one: chat prompts, no training data."""
    return SFTConfig(base_model=base_model, dataset_format="chat")


def load_trained_model(path: str | Path, config: SFTConfig) -> PreTrainedModel | PeftModel:
    """The model of `path`, in eval mode: a run directory or checkpoint gives its LoRA adapter on the base
    model, or its fully fine-tuned weights; a model folder its weights; a `.gguf` file its weights (read
    directly, not cached); anything else (a config file, a Hub id) the base model `config` names."""
    path = Path(path).expanduser()
    device = "cuda" if torch.cuda.is_available() else None
    with phase(f"Loading the model of {path}"):
        if path.is_dir():
            refuse_pickled_weights(path)
        if path.is_file() and path.suffix.lower() == ".gguf":
            model = read_gguf(path)[0].to(device or "cpu")
        elif (path / "adapter_config.json").is_file():
            read_adapter_config(path)
            with quiet_peft_deprecations():
                model = PeftModel.from_pretrained(load_model(config, device=device), path)
        elif (path / "config.json").is_file():
            model = pretrained_causal_lm(path, use_kernels=config.use_kernels, dtype="auto", device_map=device)
        elif path.is_dir():
            raise FileNotFoundError(f"{path}: holds no model: no weights (expected adapter_config.json or "
                                    "config.json)")
        else:
            model = load_model(config, device=device)
    refuse_non_finite_weights(model, path)
    return model.eval()


def _renders_as_trained(template: PromptTemplate | None, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's chat template is the one saving would write for `template` (a run saved before
    chat templates were matched to training keeps its prompts from the template object)."""
    if template is None or not tokenizer.chat_template:
        return False
    try:
        return chat_template_for(template, tokenizer) == tokenizer.chat_template
    except TemplateError:
        return False


def load_saved_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer a run saved next to its model (with the chat template it trained with), ready to pad."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer


def evaluate_loss(
    model: torch.nn.Module, data: TokenizedDataset, *, pad_token_id: int, batch_size: int = 8
) -> tuple[float, int]:
    """The mean cross-entropy per trained token over `data` (as the trainer's validation computes it), and
    the number of trained tokens. One process; the model's train/eval mode is left as it was."""
    device = next(model.parameters()).device
    loader = DataLoader(data, batch_size=batch_size, collate_fn=PaddedCollator(pad_token_id))
    batches = ({key: value.to(device) for key, value in batch.items()} for batch in loader)
    with phase(f"Evaluating {len(data)} examples"):
        loss_sum, tokens = evaluation_totals(model, batches).tolist()
    if tokens == 0:
        raise ValueError("the evaluation data has no trained tokens")
    return loss_sum / tokens, int(tokens)


class Generator:
    """Writes replies with `model`, formatting prompts with the template `config` trains with."""

    def __init__(
        self,
        model: PreTrainedModel | PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        config: SFTConfig,
        *,
        use_chat_template: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.template = resolve_template(config, tokenizer)
        """None for `completion` data: the prompt is plain text that the model continues."""
        self.use_chat_template = use_chat_template and _renders_as_trained(self.template, tokenizer)
        """Prompts come from the tokenizer's chat template (the one training saved, which renders them as the
        training template did), not from the template object."""

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = ()) -> Generator:
        """A generator for anything `load_run_config` accepts (a run, a checkpoint, a config, a model folder,
        a Hub id, a `.gguf` file)."""
        config = load_run_config(path, overrides)
        model = load_trained_model(path, config)
        saved = Path(path).is_dir() and (Path(path) / "tokenizer_config.json").is_file()
        tokenizer = load_saved_tokenizer(path) if saved else load_tokenizer(config)
        return cls(model, tokenizer, config, use_chat_template=saved)

    @property
    def is_chat(self) -> bool:
        """Whether prompts are conversations (alpaca/chat data), not plain text to continue."""
        return self.template is not None

    def prompt_text(self, conversation: Sequence[Message] | str) -> str:
        """The text the model sees: the conversation rendered up to the next assistant reply.

        A string is one user message (or, for `completion` data, the text to continue). A conversation the
        template cannot render raises `TemplateError` (also when a Jinja chat template refuses it).
        """
        if self.template is None:
            if not isinstance(conversation, str):
                raise ValueError("this model was trained on plain text (completion data); pass a string")
            return conversation
        if isinstance(conversation, str):
            conversation = [{"role": "user", "content": conversation}]
        import jinja2

        try:
            if self.use_chat_template:
                return self.tokenizer.apply_chat_template(
                    self.template.chat_messages(conversation), add_generation_prompt=True, tokenize=False
                )
            return self.template.generation_prompt(conversation, self.tokenizer)
        except jinja2.TemplateError as error:  # a chat template's raise_exception(), e.g. roles out of order
            raise TemplateError(str(error)) from None

    def prompt_length(self, conversation: Sequence[Message] | str) -> int:
        """The prompt's length in tokens."""
        return len(self._encode(self.prompt_text(conversation))["input_ids"][0])

    def prompt_ids(self, conversation: Sequence[Message] | str) -> list[int]:
        """The prompt's tokens, as the model sees them."""
        return self._encode(self.prompt_text(conversation))["input_ids"][0].tolist()

    def generate(
        self,
        conversation: Sequence[Message] | str,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        on_text: Callable[[str], None] | None = None,
    ) -> str:
        """The model's next reply (or continuation): greedy when `temperature` is 0, else sampled.

        `on_text` receives the reply piece by piece while it is generated (streaming, e.g. `sys.stdout.write`);
        the pieces joined are the returned reply, except that the reply is stripped of surrounding whitespace.
        """
        return self.answer(self.prompt_ids(conversation), max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, on_text=on_text).text

    def answer(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
    ) -> GeneratedText:
        """`generate` for a tokenized prompt (`prompt_ids`), with the answer's details; the answer ends before
        the first of the `stop` strings (`on_text` may still receive the pieces that hold it)."""
        stop_ids = stop_token_ids(self.model, self.tokenizer, self.template)
        streamer = _CallbackStreamer(self.tokenizer, on_text) if on_text is not None else None
        (reply,) = generate_batch(self.model, self.tokenizer, [prompt_ids], max_new_tokens=max_new_tokens,
                                  stop_ids=stop_ids, temperature=temperature, top_p=top_p, stop_strings=stop,
                                  streamer=streamer)
        return reply

    def _encode(self, text: str) -> dict[str, torch.Tensor]:
        # Tokenized as in training: templates that write their own special tokens get none added, and a chat
        # template's text holds every special token already.
        add_special = self.template.add_special_tokens if self.template is not None else True
        add_special = add_special and not self.use_chat_template
        return self.tokenizer(text, add_special_tokens=add_special, return_tensors="pt")


# ---------------------------------------------------------------------------------------------- batched generation


@dataclass(frozen=True)
class GenerationPrompt:
    """One evaluation prompt: its text for people to read, the token ids the model sees, the expected answer."""

    prompt: str
    """The last user message (with an alpaca `input`), or the plain text of a completion prompt."""
    input_ids: list[int]
    """The rendered prompt's tokens, exactly as the training text starts up to where the answer begins."""
    reference: str


@dataclass(frozen=True)
class GeneratedText:
    """One answer: its text (special tokens removed, whitespace stripped), whether it ended with a stop token
    before the token limit, and how many tokens were generated (the stop token included)."""

    text: str
    stopped: bool
    num_tokens: int


def generation_prompts(
    rows: Iterable[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    dataset_format: str,
    template: PromptTemplate | None,
    text_field: str = "text",
    source: str = "eval_dataset",
) -> list[GenerationPrompt]:
    """Evaluation rows as prompts (see `data.prompt_and_reference` for the row shapes).

    Each prompt is rendered with `template` as the training text of the same conversation would be, and its
    tokens are that training text's tokens up to where the answer starts, so the model sees exactly what it saw
    in training before each reply. Errors name `source` and the row (1-based).
    """
    prompts = []
    for index, row in enumerate(rows):
        where = f"{source}: row {index + 1}"
        prompt, reference = prompt_and_reference(row, dataset_format, text_field=text_field, where=where)
        try:
            ids = _prompt_ids(prompt, reference, tokenizer, template)
        except TemplateError as error:
            raise DataError(f"{where}: cannot render the prompt: {error}") from None
        shown = prompt if isinstance(prompt, str) else next(
            (message_text(m) for m in reversed(prompt) if m["role"] == "user"), ""
        )
        prompts.append(GenerationPrompt(shown, ids, reference))
    return prompts


def _prompt_ids(
    prompt: Sequence[Message] | str,
    reference: str,
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate | None,
) -> list[int]:
    """The tokens of the training text of `prompt` + `reference` before the first token of the answer."""
    if template is None:
        if not isinstance(prompt, str):
            raise TemplateError("a completion run's prompt is plain text, not messages")
        segments: list[Segment] = [(prompt, False), (reference + (tokenizer.eos_token or ""), True)]
        add_special_tokens = True
    else:
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        segments = template.render([*prompt, {"role": "assistant", "content": reference}], tokenizer)
        add_special_tokens = template.add_special_tokens
    answer = max((i for i, (_, trainable) in enumerate(segments) if trainable), default=len(segments))
    prompt_text = "".join(text for text, _ in segments[:answer])
    if not getattr(tokenizer, "is_fast", False):  # no character offsets: tokenize the prompt alone
        return tokenizer(prompt_text, add_special_tokens=add_special_tokens)["input_ids"]
    full = tokenizer("".join(text for text, _ in segments), add_special_tokens=add_special_tokens,
                     return_offsets_mapping=True)
    ends = [end for _, end in full["offset_mapping"]]
    cut = next((i for i, end in enumerate(ends) if end > len(prompt_text)), len(ends))
    return full["input_ids"][:cut]


def stop_token_ids(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, template: PromptTemplate | None = None
) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS, the model's own end-of-turn tokens, and the
    template's turn terminator (such as ChatML's `<|im_end|>`) when it is a single token."""
    ids = [tokenizer.eos_token_id]
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += model_eos if isinstance(model_eos, list) else [model_eos]
    if template is not None:
        with contextlib.suppress(TemplateError, ValueError, KeyError):
            turn = [{"role": "user", "content": "?"}, {"role": "assistant", "content": ""}]
            trained = [text for text, trainable in template.render(turn, tokenizer) if trainable]
            terminator = trained[-1].strip() if trained else ""
            if terminator and terminator in tokenizer.get_vocab():
                ids.append(tokenizer.convert_tokens_to_ids(terminator))
    return list(dict.fromkeys(i for i in ids if i is not None))


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so left padding stays small; the same
    lengths always give the same batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def generate_batch(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    synced_gpus: bool = False,
    streamer: TextStreamer | None = None,
    stop_strings: Sequence[str] = (),
) -> list[GeneratedText]:
    """Answers to a batch of tokenized prompts in one `generate` call.

    Prompts are left-padded, decoding uses the KV cache, is greedy at a `temperature` below `GREEDY_BELOW`
    (else samples with `temperature`/`top_p`) and stops each row at its first stop token, or its first
    `stop_strings` text (cut from the answer). Runs in eval mode under `no_grad` and puts the model back in the
    mode it was in. `synced_gpus` keeps every process stepping until all are done
    (needed when the weights are sharded, where each forward pass is collective); `streamer` receives the
    tokens as they are generated (one prompt).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= temperature < math.inf or not 0 < top_p <= 1:  # written so that NaN fails too
        raise ValueError(f"need a finite temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    if not prompts:
        return []
    if empty := [index for index, ids in enumerate(prompts) if not len(ids)]:
        raise ValueError(f"prompt {empty[0]} is empty (no tokens): give the model some text to continue")
    stops = set(stop_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stop_ids), 0)
    device = next(model.parameters()).device
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    # Every decoding choice is explicit, so the model's own generation defaults (often sampling) never apply.
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature >= GREEDY_BELOW else {
        "do_sample": False}
    settings = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids), pad_token_id=pad_id,
                                use_cache=True, num_beams=1, **sampling)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (autocast or contextlib.nullcontext)():
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=settings, synced_gpus=synced_gpus, streamer=streamer,
                                    stopping_criteria=StoppingCriteriaList(
                                        [_StopStrings(tokenizer, stop_strings, width)] if stop_strings else []))
    finally:
        model.train(was_training)
    answers = []
    for new in output[:, width:].tolist():
        end = next((i for i, token in enumerate(new) if token in stops), None)
        tokens = new if end is None else new[:end]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((at for at in (text.find(s) for s in stop_strings if s) if at >= 0), default=None)
        if cut is not None:
            text = text[:cut]
        answers.append(GeneratedText(text.strip(), end is not None or cut is not None,
                                     len(new) if end is None else end + 1))
    return answers


def generate_all(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
    **settings: Any,
) -> list[GeneratedText]:
    """Answers to every prompt, in the order given, generated in batches of similar length (`generate_batch`
    takes the other settings)."""
    answers: list[GeneratedText | None] = [None] * len(prompts)
    for batch in length_batches([len(ids) for ids in prompts], batch_size):
        for index, answer in zip(batch, generate_batch(model, tokenizer, [prompts[i] for i in batch], **settings),
                                 strict=True):
            answers[index] = answer
    return [answer for answer in answers if answer is not None]


class _StopStrings(StoppingCriteria):
    """Ends each row once its answer's text (after the `width` prompt tokens) holds one of `stop_strings`; on the
    decoded text, so it works with any tokenizer (transformers' `stop_strings` needs a subword vocabulary)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_strings: Sequence[str], width: int) -> None:
        self.tokenizer, self.stop_strings, self.width = tokenizer, [s for s in stop_strings if s], width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.width :], skip_special_tokens=True)
        return torch.tensor([any(s in text for s in self.stop_strings) for text in texts], device=input_ids.device)


class _CallbackStreamer(TextStreamer):
    """Hands each finished piece of the reply to a callback (leading whitespace dropped, like the reply)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._on_text = on_text
        self._started = False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        if text:
            self._on_text(text)
