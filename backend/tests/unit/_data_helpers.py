"""A small byte-level BPE tokenizer for the data and template tests, built locally in milliseconds.

Byte-level BPE (as in GPT-2, Llama 3, Qwen, SmolLM) decodes back to exactly the text it encoded, so tests can
compare the decoded trained tokens with the response text character for character. Like SmolLM2, its pad
token is its end-of-turn token `<|im_end|>`, so a mask derived from the pad id would be wrong.
"""

from __future__ import annotations

from helpers import CHATML_TEMPLATE
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS = "<s>", "<|im_end|>"
SPECIALS = ["<|im_start|>", EOS, BOS, "</s>", "<unk>"]


_CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "[INST] <<SYS>>\n<</SYS>>\n\n [/INST]",
    "system user assistant",
    "What is the capital of France? The capital of France is Paris.",
    "Translate to German: good morning. Guten Morgen!",
    "Hello there, how are you today? I am fine, thanks for asking.",
    "Count from one to five: 1, 2, 3, 4, 5.",
]


def bpe_tokenizer(
    *, add_bos: bool = False, chat_template: str | None = CHATML_TEMPLATE, trim_offsets: bool = True
) -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer; `add_bos=True` makes it prepend `<s>` like Llama tokenizers do.

    `trim_offsets=False` keeps a token's leading space in its character offsets (as Llama 3 does).
    """
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(_CORPUS * 3, trainer)
    byte_level = processors.ByteLevel(trim_offsets=trim_offsets)
    if add_bos:
        bos_id = backend.token_to_id(BOS)
        prepend = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
        )
        backend.post_processor = processors.Sequence([byte_level, prepend])
    else:
        backend.post_processor = byte_level
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token="<unk>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def trained_text(tokenizer: PreTrainedTokenizerFast, example: dict[str, list[int]]) -> list[str]:
    """The decoded runs of consecutive trained tokens (labels != -100) of a tokenized example."""
    runs: list[list[int]] = []
    previous = -100
    for label in example["labels"]:
        if label != -100:
            if previous == -100:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return [tokenizer.decode(run) for run in runs]
