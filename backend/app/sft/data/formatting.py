"""Formatting: an alpaca, chat (OpenAI `messages` or ShareGPT `conversations`) or completion row becomes a list of
messages or a plain text (`format_row`, `prompt_and_reference`), and the prompt template that renders them is
chosen (`resolve_template`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedTokenizerBase

from app.sft.config import SFTConfig
from app.sft.errors import ConfigError, DataError
from app.sft.templates import Message, PromptTemplate, TemplateError, TokenizerChatTemplate, default_registry

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}
CHAT_ROLES = ("system", "user", "assistant")
"""The roles a chat row's messages may have (ShareGPT speakers are mapped to these)."""


def format_row(
    row: Mapping[str, Any], dataset_format: str, *, text_field: str = "text", where: str = "row 1"
) -> list[Message] | str:
    """An alpaca or chat row as messages, or a completion row's text; `where` names the row in errors.

    Alpaca: `instruction`, optional `input`, `output` -> a user message (with `input`) and an assistant
    message. Chat: `messages: [{role, content}]`, or ShareGPT `conversations: [{from, value}]` with
    human/gpt/system mapped to user/assistant/system. Completion: the `text_field` string.
    """
    if dataset_format == "alpaca":
        instruction = _string_field(row, "instruction", where)
        extra = _string_field(row, "input", where, required=False)
        output = _string_field(row, "output", where)
        user: dict[str, str] = {"role": "user", "content": instruction}
        if extra:
            user["input"] = extra
        return [user, {"role": "assistant", "content": output}]
    if dataset_format == "chat":
        return _chat_messages(row, where)
    if dataset_format == "completion":
        return _string_field(row, text_field, where)
    raise ValueError(f"unknown dataset_format {dataset_format!r}; expected alpaca, chat or completion")


def _string_field(row: Mapping[str, Any], name: str, where: str, *, required: bool = True) -> str:
    value = row.get(name)
    if value is None:
        if required:
            present = ", ".join(repr(key) for key, item in row.items() if item is not None)
            raise DataError(f"{where}: missing field {name!r} (the row has {present or 'no fields'})")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _chat_messages(row: Mapping[str, Any], where: str) -> list[Message]:
    if row.get("messages") is not None:
        field, role_key, content_key, aliases = "messages", "role", "content", None
    elif row.get("conversations") is not None:
        field, role_key, content_key, aliases = "conversations", "from", "value", _SHAREGPT_ROLES
    else:
        raise DataError(f"{where}: missing field 'messages' (or ShareGPT's 'conversations')")
    turns = row[field]
    if not isinstance(turns, list):
        raise DataError(f"{where}: field {field!r} must be a list of messages, got {type(turns).__name__}")
    messages: list[Message] = []
    for index, turn in enumerate(turns):
        at = f"{where}: {field}[{index}]"
        if not isinstance(turn, Mapping):
            raise DataError(f"{at} must be an object with {role_key!r} and {content_key!r}")
        role, content = turn.get(role_key), turn.get(content_key)
        if not isinstance(role, str) or not role:
            raise DataError(f"{at}: field {role_key!r} is missing or not a string")
        if not isinstance(content, str):
            kind = "missing" if content is None else f"a {type(content).__name__}, not a string"
            raise DataError(f"{at}: field {content_key!r} is {kind}")
        if aliases is not None:
            if role.lower() not in aliases:
                raise DataError(
                    f"{at}: unknown speaker {role!r} in field 'from' (expected human, gpt or system)"
                )
            role = aliases[role.lower()]
        elif role not in CHAT_ROLES:
            raise DataError(
                f"{at}: unknown role {role!r} in field 'role' (accepted roles: {', '.join(CHAT_ROLES)})"
            )
        messages.append({"role": role, "content": content})
    return messages


def prompt_and_reference(
    row: Mapping[str, Any], dataset_format: str, *, text_field: str = "text", where: str = "row 1"
) -> tuple[list[Message] | str, str]:
    """What to ask and the answer to expect, for evaluation by generation; `where` names the row in errors.

    A row with `reference` gives its `prompt` (a user message, or plain text for `completion` runs) or its
    `messages` (the conversation so far). Otherwise an alpaca row's `output`, or a chat row's last assistant
    turn, is the reference, and everything before it the prompt (as `format_row` reads it for training).
    Completion rows (`text`) have no reference answer and are refused.
    """
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a mapping of fields, got {type(row).__name__}")
    if row.get("reference") is not None:
        reference = _string_field(row, "reference", where)
        if row.get("messages") is not None:
            if dataset_format == "completion":
                raise DataError(f"{where}: 'messages' need a chat or alpaca run; a completion run takes a 'prompt'")
            return _chat_messages(row, where), reference
        prompt = _string_field(row, "prompt", where)
        return (prompt if dataset_format == "completion" else [{"role": "user", "content": prompt}]), reference
    if dataset_format == "completion":
        raise DataError(
            f"{where}: completion rows ({text_field!r}) have no reference answer to compare with; give rows "
            "with 'prompt' and 'reference'"
        )
    formatted = format_row(row, dataset_format, where=where)
    assert not isinstance(formatted, str)  # alpaca and chat rows are conversations
    messages, _ = without_leading_replies(formatted)
    last = max((i for i, message in enumerate(messages) if message["role"] == "assistant"), default=None)
    if last is None or last == 0:
        raise DataError(f"{where}: no assistant reply to compare with (or give 'prompt'/'messages' and 'reference')")
    return messages[:last], str(messages[last]["content"])


def without_leading_replies(messages: list[Message]) -> tuple[list[Message], bool]:
    """Drop assistant messages that come before the first user message (nothing prompted them)."""
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    kept = [m for i, m in enumerate(messages) if i >= first_user or m["role"] != "assistant"]
    return kept, len(kept) != len(messages)


def default_template(dataset_format: str, tokenizer: PreTrainedTokenizerBase) -> PromptTemplate | None:
    """alpaca -> `alpaca`; chat -> the tokenizer's own chat template, else `chatml`; completion -> None."""
    if dataset_format == "completion":
        return None
    if dataset_format == "chat":
        return default_registry.get("tokenizer" if getattr(tokenizer, "chat_template", None) else "chatml")
    return default_registry.get("alpaca")


def resolve_template(config: SFTConfig, tokenizer: PreTrainedTokenizerBase) -> PromptTemplate | None:
    """The template `config.template_name` names, or the default for the data format (None: plain text)."""
    if config.template_name is None:
        return default_template(config.dataset_format, tokenizer)
    try:
        template = default_registry.get(config.template_name)
    except TemplateError as error:
        raise ConfigError(f"template_name: {error}") from None
    if isinstance(template, TokenizerChatTemplate) and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"template_name: 'tokenizer' needs a chat template; tokenizer {tokenizer.name_or_path!r} has none"
        )
    return template
