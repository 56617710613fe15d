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
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TextStreamer,
)

from app.sft import checkpointing
from app.sft.config import SFTConfig
from app.sft.data import PaddedCollator, TokenizedDataset, resolve_template
from app.sft.loss import evaluation_totals
from app.sft.modeling import load_model, load_tokenizer, quiet_peft_deprecations
from app.sft.progress import phase
from app.sft.templates import Message

RUN_CONFIG_FILE = "config.yaml"
"""The config a finished run writes into its output directory."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
"""`org/name`: a Hugging Face Hub model id (a bare name such as `gpt2` is read as a local path)."""


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> SFTConfig:
    """The config of whatever names a model: a run directory (`config.yaml`), a checkpoint (`sft_config.json`),
    a YAML config file, a Hugging Face model folder, a Hub id (`org/name`) or a `.gguf` file.

    A model folder's own `config.yaml` (what `sft merge` writes into `merged/`) gives the data format and
    template, with `base_model` set to the folder itself; a target without one is a chat model (see the module
    docstring). `overrides` are `key=value` settings as for `sft train --set`. A path that is none of these
    raises `FileNotFoundError` saying what was expected.
    """
    text = str(path)
    path = Path(path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        config = _bare_model_config(str(path))
    elif path.is_file():
        config = SFTConfig.from_yaml(path)
    elif (path / RUN_CONFIG_FILE).is_file():
        config = SFTConfig.from_yaml(path / RUN_CONFIG_FILE)
    elif (saved := checkpointing.read_config(path) if path.is_dir() else None) is not None:
        config = SFTConfig.from_dict(saved, source=str(path / checkpointing.CONFIG_FILE))
    elif _is_model_folder(path):
        config = _bare_model_config(str(path))
    elif not path.exists() and _HUB_ID.match(text) and ".." not in text:
        config = _bare_model_config(text)
    else:
        raise FileNotFoundError(
            f"{path}: holds no model: not a config file, a run directory (with {RUN_CONFIG_FILE}), a checkpoint "
            f"(with {checkpointing.CONFIG_FILE}), a Hugging Face model folder (with config.json), a .gguf file "
            "or a Hub id (org/name)"
        )
    if _is_model_folder(path) and (path / "tokenizer_config.json").is_file():  # its own weights and tokenizer
        config = config.model_copy(update={"base_model": str(path)})
    return config.with_overrides(list(overrides)) if overrides else config


def _is_model_folder(path: Path) -> bool:
    """A folder of full model weights in Hugging Face format (not a LoRA adapter)."""
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()


def _bare_model_config(base_model: str) -> SFTConfig:
    """The config for a model that comes without one: chat prompts, no training data."""
    return SFTConfig(base_model=base_model, dataset_format="chat")


def load_trained_model(path: str | Path, config: SFTConfig) -> PreTrainedModel | PeftModel:
    """The model of `path`, in eval mode: a run directory or checkpoint gives its LoRA adapter on the base
    model, or its fully fine-tuned weights; a model folder its weights; anything else (a config file, a
    `.gguf` file, a Hub id) the base model `config` names."""
    path = Path(path).expanduser()
    device = "cuda" if torch.cuda.is_available() else None
    with phase(f"Loading the model of {path}"):
        if (path / "adapter_config.json").is_file():
            with quiet_peft_deprecations():
                model = PeftModel.from_pretrained(load_model(config, device=device), path)
        elif (path / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map=device)
        elif path.is_dir():
            raise FileNotFoundError(f"{path}: holds no model weights (expected adapter_config.json or "
                                    "config.json)")
        else:
            model = load_model(config, device=device)
    return model.eval()


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
        self, model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, config: SFTConfig
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.template = resolve_template(config, tokenizer)
        """None for `completion` data: the prompt is plain text that the model continues."""

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = ()) -> Generator:
        """A generator for anything `load_run_config` accepts (a run, a checkpoint, a config, a model folder,
        a Hub id, a `.gguf` file)."""
        config = load_run_config(path, overrides)
        model = load_trained_model(path, config)
        return cls(model, load_tokenizer(config), config)

    @property
    def is_chat(self) -> bool:
        """Whether prompts are conversations (alpaca/chat data), not plain text to continue."""
        return self.template is not None

    def prompt_text(self, conversation: Sequence[Message] | str) -> str:
        """The text the model sees: the conversation rendered up to the next assistant reply.

        A string is one user message (or, for `completion` data, the text to continue).
        """
        if self.template is None:
            if not isinstance(conversation, str):
                raise ValueError("this model was trained on plain text (completion data); pass a string")
            return conversation
        if isinstance(conversation, str):
            conversation = [{"role": "user", "content": conversation}]
        return self.template.generation_prompt(conversation, self.tokenizer)

    def prompt_length(self, conversation: Sequence[Message] | str) -> int:
        """The prompt's length in tokens."""
        return len(self._encode(self.prompt_text(conversation))["input_ids"][0])

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
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
        inputs = self._encode(self.prompt_text(conversation))
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
        settings = GenerationConfig(
            max_new_tokens=max_new_tokens,
            eos_token_id=self._stop_ids(),
            pad_token_id=self.tokenizer.pad_token_id,
            **sampling,
        )
        device = next(self.model.parameters()).device
        inputs = {key: value.to(device) for key, value in inputs.items()}
        streamer = _CallbackStreamer(self.tokenizer, on_text) if on_text is not None else None
        with torch.no_grad():
            output = self.model.generate(**inputs, generation_config=settings, streamer=streamer)
        reply = output[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(reply, skip_special_tokens=True).strip()

    def _encode(self, text: str) -> dict[str, torch.Tensor]:
        # Tokenized as in training: templates that write their own special tokens get none added.
        add_special = self.template.add_special_tokens if self.template is not None else True
        return self.tokenizer(text, add_special_tokens=add_special, return_tensors="pt")

    def _stop_ids(self) -> list[int]:
        """The tokenizer's EOS and the model's own end-of-turn tokens."""
        ids = [self.tokenizer.eos_token_id]
        model_eos = self.model.generation_config.eos_token_id
        ids += model_eos if isinstance(model_eos, list) else [model_eos]
        return list(dict.fromkeys(i for i in ids if i is not None))


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
