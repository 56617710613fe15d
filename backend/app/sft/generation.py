"""Inference with a base model or a fine-tuned run: loading it, its validation loss, prompts in the training
format, greedy or sampled replies.

A model answers best when its prompt looks exactly like the training text up to the reply, so prompts are
rendered with the prompt template the run was trained with (`data.resolve_template`: the config's
`template_name`, or the default for its `dataset_format`).

    generator = Generator.load("outputs/demo")            # a run directory, a checkpoint, or a config file
    generator.generate([{"role": "user", "content": "Name three colours."}])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from app.sft import checkpointing
from app.sft.audit import chat_template_for
from app.sft.config import SFTConfig
from app.sft.data import PaddedCollator, TokenizedDataset, resolve_template
from app.sft.loss import evaluation_totals
from app.sft.modeling import (
    ensure_pad_token,
    load_model,
    load_tokenizer,
    quiet_peft_deprecations,
    read_gguf,
    refuse_pickled_weights,
)
from app.sft.templates import Message, PromptTemplate, TemplateError

RUN_CONFIG_FILE = "config.yaml"
"""The config a finished run writes into its output directory."""


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> SFTConfig:
    """The config of a run directory (`config.yaml`), a checkpoint (`sft_config.json`) or a YAML config file.

    A `.gguf` file (such as one `sft export` wrote) gets a config with the file as its base model, prompted with
    the chat template in the file (plain text when it has none). `overrides` are `key=value` settings as for
    `sft train --set`. A path that is none of these raises `FileNotFoundError` naming it.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        data_format = "chat" if _gguf_has_chat_template(path) else "completion"
        config = SFTConfig(base_model=str(path), dataset_format=data_format)
    elif path.is_file():
        config = SFTConfig.from_yaml(path)
    elif (path / RUN_CONFIG_FILE).is_file():
        config = SFTConfig.from_yaml(path / RUN_CONFIG_FILE)
    elif (saved := checkpointing.read_config(path) if path.is_dir() else None) is not None:
        config = SFTConfig.from_dict(saved, source=str(path / checkpointing.CONFIG_FILE))
    else:
        raise FileNotFoundError(
            f"{path}: not a config file, a run directory (with {RUN_CONFIG_FILE}) or a checkpoint "
            f"(with {checkpointing.CONFIG_FILE})"
        )
    return config.with_overrides(list(overrides)) if overrides else config


def _gguf_has_chat_template(path: Path) -> bool:
    import gguf

    return gguf.GGUFReader(path).get_field(gguf.Keys.Tokenizer.CHAT_TEMPLATE) is not None


def load_trained_model(path: str | Path, config: SFTConfig) -> PreTrainedModel | PeftModel:
    """The model of `path`, in eval mode: a `.gguf` file its weights (read directly, not cached); a config file
    its base model; a run directory or checkpoint its LoRA adapter on that base model, or its fully fine-tuned
    weights."""
    path = Path(path)
    device = "cuda" if torch.cuda.is_available() else None
    if path.is_dir():
        refuse_pickled_weights(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        model = read_gguf(path)[0].to(device or "cpu")
    elif path.is_file():
        model = load_model(config, device=device)
    elif (path / "adapter_config.json").is_file():
        with quiet_peft_deprecations():
            model = PeftModel.from_pretrained(load_model(config, device=device), path)
    elif (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map=device)
    else:
        raise FileNotFoundError(f"{path}: no weights (expected adapter_config.json or config.json)")
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
        """A generator for a run directory, a checkpoint or a config file (its base model).

        A run directory's own tokenizer is used, with the chat template saved with the model.
        """
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

        A string is one user message (or, for `completion` data, the text to continue).
        """
        if self.template is None:
            if not isinstance(conversation, str):
                raise ValueError("this model was trained on plain text (completion data); pass a string")
            return conversation
        if isinstance(conversation, str):
            conversation = [{"role": "user", "content": conversation}]
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(
                self.template.chat_messages(conversation), add_generation_prompt=True, tokenize=False
            )
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
    ) -> str:
        """The model's next reply (or continuation): greedy when `temperature` is 0, else sampled."""
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
        with torch.no_grad():
            output = self.model.generate(**inputs, generation_config=settings)
        reply = output[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(reply, skip_special_tokens=True).strip()

    def _encode(self, text: str) -> dict[str, torch.Tensor]:
        # Tokenized as in training: templates that write their own special tokens get none added, and a chat
        # template's text holds every special token already.
        add_special = self.template.add_special_tokens if self.template is not None else True
        add_special = add_special and not self.use_chat_template
        return self.tokenizer(text, add_special_tokens=add_special, return_tensors="pt")

    def _stop_ids(self) -> list[int]:
        """The tokenizer's EOS and the model's own end-of-turn tokens."""
        ids = [self.tokenizer.eos_token_id]
        model_eos = self.model.generation_config.eos_token_id
        ids += model_eos if isinstance(model_eos, list) else [model_eos]
        return list(dict.fromkeys(i for i in ids if i is not None))
