"""Prompt templates: exact rendered text, which parts are trainable, generation prompts, the registry."""

from __future__ import annotations

import pytest
from _data_helpers import bpe_tokenizer

from app.sft.templates import (
    AlpacaTemplate,
    ChatMLTemplate,
    PromptTemplate,
    Segment,
    TemplateError,
    TemplateRegistry,
    TokenizerChatTemplate,
    default_registry,
)

TOKENIZER = bpe_tokenizer()
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def trainable(segments: list[Segment]) -> list[str]:
    return [text for text, flag in segments if flag]


def joined(segments: list[Segment]) -> str:
    return "".join(text for text, _ in segments)


def test_alpaca_renders_the_standard_stanford_prompt_with_and_without_input() -> None:
    alpaca = default_registry.get("alpaca")
    plain = alpaca.render(
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}], TOKENIZER
    )
    assert plain == [
        (
            "Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n",
            False,
        ),
        ("Blue<|im_end|>", True),
    ]
    with_input = alpaca.render(
        [
            {"role": "user", "content": "Translate.", "input": "Hallo"},
            {"role": "assistant", "content": "Hello"},
        ],
        TOKENIZER,
    )
    assert joined(with_input) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate.\n\n### Input:\nHallo\n\n### Response:\nHello<|im_end|>"
    )
    assert trainable(with_input) == ["Hello<|im_end|>"]


def test_alpaca_uses_a_system_message_as_preamble_and_renders_several_turns() -> None:
    segments = AlpacaTemplate().render(CHAT, TOKENIZER)
    assert joined(segments) == (
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!<|im_end|>\n\n"
        "### Instruction:\nCapital of France?\n\n### Response:\nParis.<|im_end|>"
    )
    assert trainable(segments) == ["Hello!<|im_end|>", "Paris.<|im_end|>"]
    with pytest.raises(TemplateError, match="alpaca template: unsupported role 'tool'"):
        AlpacaTemplate().render([*CHAT, {"role": "tool", "content": "{}"}], TOKENIZER)


def test_chatml_trains_on_replies_and_their_end_of_turn_token_only() -> None:
    segments = ChatMLTemplate().render(CHAT, TOKENIZER)
    assert joined(segments) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
    )
    assert trainable(segments) == ["Hello!<|im_end|>", "Paris.<|im_end|>"]


def test_non_alpaca_templates_append_an_alpaca_input_to_the_instruction() -> None:
    messages = [
        {"role": "user", "content": "Translate.", "input": "Hallo"},
        {"role": "assistant", "content": "Hi"},
    ]
    assert "<|im_start|>user\nTranslate.\n\nHallo<|im_end|>" in joined(
        ChatMLTemplate().render(messages, TOKENIZER)
    )


def test_llama2_wraps_each_exchange_with_bos_eos_and_the_system_prompt_in_the_first() -> None:
    llama2 = default_registry.get("llama2")
    segments = llama2.render(CHAT, TOKENIZER)
    assert joined(segments) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! <|im_end|>"
        "<s>[INST] Capital of France? [/INST] Paris. <|im_end|>"
    )
    assert trainable(segments) == [" Hello! <|im_end|>", " Paris. <|im_end|>"]
    assert llama2.add_special_tokens is False  # it writes <s> itself; the tokenizer must not add another
    with pytest.raises(TemplateError, match="roles must alternate .* message 2 is 'user'"):
        llama2.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], TOKENIZER)


def test_tokenizer_template_matches_apply_chat_template_and_trains_only_replies() -> None:
    segments = TokenizerChatTemplate().render(CHAT, TOKENIZER)
    assert joined(segments) == TOKENIZER.apply_chat_template(CHAT, tokenize=False)
    assert trainable(segments) == ["Hello!<|im_end|>", "Paris.<|im_end|>"]
    ends_with_user = CHAT[:4]
    segments = TokenizerChatTemplate().render(ends_with_user, TOKENIZER)
    assert joined(segments) == TOKENIZER.apply_chat_template(ends_with_user, tokenize=False)
    assert trainable(segments) == ["Hello!<|im_end|>"]


def test_tokenizer_template_refuses_templates_that_rewrite_earlier_turns() -> None:
    # Renders only the newest reply in full, like templates that strip the reasoning of earlier turns.
    rewriting = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<a>old</a>"
        "{% else %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tokenizer = bpe_tokenizer(chat_template=rewriting)
    with pytest.raises(
        TemplateError, match=r"does not render this conversation as growing prefixes \(at message 5\)"
    ):
        TokenizerChatTemplate().render(CHAT, tokenizer)


def test_tokenizer_template_needs_a_chat_template_and_a_prompt() -> None:
    with pytest.raises(TemplateError, match="has no chat template"):
        TokenizerChatTemplate().render(CHAT, bpe_tokenizer(chat_template=None))
    with pytest.raises(TemplateError, match="starts with an assistant message"):
        TokenizerChatTemplate().render(CHAT[2:], TOKENIZER)


@pytest.mark.parametrize(
    ("name", "ending"),
    [
        ("alpaca", "### Instruction:\nCapital of France?\n\n### Response:\n"),
        ("chatml", "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"),
        ("llama2", "<s>[INST] Capital of France? [/INST]"),
        ("tokenizer", "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"),
    ],
)
def test_generation_prompt_ends_where_the_next_reply_starts(name: str, ending: str) -> None:
    prompt = default_registry.get(name).generation_prompt(CHAT[:4], TOKENIZER)
    assert prompt.endswith(ending)
    assert "Hello!" in prompt and "Paris" not in prompt


def test_registry_registers_looks_up_and_lists_templates() -> None:
    class Shouting(PromptTemplate):
        name = "shouting"

        def render(self, messages, tokenizer):  # type: ignore[no-untyped-def]
            return [(m["content"].upper(), m["role"] == "assistant") for m in messages]

    registry = TemplateRegistry()
    registry.register("shouting", Shouting())
    assert registry.names() == ["shouting"] and "shouting" in registry
    assert registry.get("shouting").render(CHAT[1:3], TOKENIZER) == [("HI", False), ("HELLO!", True)]
    with pytest.raises(ValueError, match="already registered"):
        registry.register("shouting", Shouting())
    registry.register("shouting", ChatMLTemplate(), overwrite=True)
    assert isinstance(registry.get("shouting"), ChatMLTemplate)
    with pytest.raises(TypeError, match="must be a PromptTemplate"):
        registry.register("bad", "chatml")  # type: ignore[arg-type]


def test_unknown_template_lists_the_known_ones() -> None:
    with pytest.raises(
        TemplateError, match="unknown template 'vicuna'; known templates: alpaca, chatml, llama2, tokenizer"
    ):
        default_registry.get("vicuna")
