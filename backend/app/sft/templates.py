"""Prompt templates: how a conversation becomes training text, and which part of that text is trained.

A template renders a list of messages (`{"role": ..., "content": ...}`) into segments `(text, trainable)`.
The data pipeline tokenizes the joined text once and trains only on tokens that end inside a trainable
segment, so prompts and user turns are masked without ever looking at token ids (a tokenizer's pad token
is often its end-of-turn token, so masks derived from ids would be wrong).

Alpaca rows keep their optional `input` on the user message (`{"role": "user", "content": instruction,
"input": input}`): the alpaca template renders it as the standard `### Input:` block, every other template
appends it to the instruction.

Built-ins: `alpaca`, `chatml`, `llama2` and `tokenizer` (the tokenizer's own chat template). Register your
own with `default_registry.register(name, template)`.

At save time, `chat_template_for` gives the Jinja chat template that renders conversations exactly as training
did, so the saved tokenizer chats in the trained format (`modeling.save_final_model`).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

Message = Mapping[str, Any]
"""One turn: `role` (system/user/assistant), `content` (str), and for alpaca rows an optional `input`."""
Segment = tuple[str, bool]
"""A piece of rendered text and whether the model is trained to produce it."""


class TemplateError(ValueError):
    """A template that is unknown, or that cannot render the given conversation."""


def message_text(message: Message) -> str:
    """The message's content, with an alpaca `input` appended after a blank line when present."""
    extra = message.get("input")
    return f"{message['content']}\n\n{extra}" if extra else str(message["content"])


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join neighbouring segments with the same flag and drop empty ones."""
    merged: list[Segment] = []
    for text, trainable in segments:
        if not text:
            continue
        if merged and merged[-1][1] == trainable:
            merged[-1] = (merged[-1][0] + text, trainable)
        else:
            merged.append((text, trainable))
    return merged


class PromptTemplate(ABC):
    """Renders conversations into `(text, trainable)` segments."""

    name: str = ""
    add_special_tokens: bool = True
    """Whether the tokenizer adds its own special tokens (a BOS) around the rendered text, as
    `tokenizer(text)` does; False for templates that write them themselves."""

    @abstractmethod
    def render(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
        """The conversation as segments; assistant replies (with their end-of-turn marker) are trainable."""

    def generation_prompt(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> str:
        """The text to give the model so that it writes the next assistant reply."""
        segments = self.render([*messages, {"role": "assistant", "content": ""}], tokenizer)
        last_trainable = max(
            (i for i, (_, trainable) in enumerate(segments) if trainable), default=len(segments)
        )
        return "".join(text for text, _ in segments[:last_trainable])

    def chat_template(self, tokenizer: PreTrainedTokenizerBase) -> str | None:
        """A Jinja chat template that renders conversations as this template does (saved with the tokenizer, so
        chat after training uses the trained format), or None when it cannot be written as one.

        It writes no special token the tokenizer itself adds (`add_special_tokens`); `chat_template_for`
        adds those and checks the result token for token.
        """
        return None

    def chat_messages(self, messages: Sequence[Message]) -> list[dict[str, Any]]:
        """The messages as `chat_template()` expects them (`apply_chat_template`'s conversation)."""
        return [dict(message) for message in messages]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _literal(text: str) -> str:
    """A Jinja string literal of `text`."""
    return json.dumps(text)


_JINJA_TEXT = "message['content'] ~ (('\\n\\n' ~ message['input']) if message['input'] else '')"
"""Jinja for `message_text(message)`: the content, and an alpaca `input` after a blank line."""


class AlpacaTemplate(PromptTemplate):
    """The Stanford Alpaca prompt; each response is followed by the tokenizer's EOS token.

    A first system message replaces the standard preamble. Several user/assistant turns are rendered as
    consecutive `### Instruction:` / `### Response:` blocks.
    """

    name = "alpaca"
    PREAMBLE = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
    )
    PREAMBLE_WITH_INPUT = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request."
    )

    def render(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
        eos = tokenizer.eos_token or ""
        turns = list(messages)
        if turns and turns[0]["role"] == "system":
            preamble = str(turns.pop(0)["content"])
        elif any(turn.get("input") for turn in turns):
            preamble = self.PREAMBLE_WITH_INPUT
        else:
            preamble = self.PREAMBLE
        segments: list[Segment] = [(preamble + "\n\n", False)]
        for index, turn in enumerate(turns):
            role = turn["role"]
            if role == "user":
                block = f"### Instruction:\n{turn['content']}\n\n"
                if turn.get("input"):
                    block += f"### Input:\n{turn['input']}\n\n"
                segments.append((block, False))
            elif role == "assistant":
                segments.append(("### Response:\n", False))
                segments.append((f"{turn['content']}{eos}", True))
                if index + 1 < len(turns):
                    segments.append(("\n\n", False))
            else:
                raise TemplateError(
                    f"alpaca template: unsupported role {role!r} (system only as the first message)"
                )
        return _merge(segments)

    def chat_template(self, tokenizer: PreTrainedTokenizerBase) -> str | None:
        return (
            "{%- set ns = namespace(has_input=false) -%}"
            "{%- for message in messages -%}{%- if message['input'] -%}{%- set ns.has_input = true -%}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{{- messages[0]['content'] -}}{%- set turns = messages[1:] -%}"
            f"{{%- else -%}}{{{{- {_literal(self.PREAMBLE_WITH_INPUT)} if ns.has_input else "
            f"{_literal(self.PREAMBLE)} -}}}}"
            "{%- set turns = messages -%}{%- endif -%}"
            "{{- '\\n\\n' -}}"
            "{%- for message in turns -%}"
            "{%- if message['role'] == 'user' -%}"
            "{{- '### Instruction:\\n' ~ message['content'] ~ '\\n\\n' -}}"
            "{%- if message['input'] -%}{{- '### Input:\\n' ~ message['input'] ~ '\\n\\n' -}}{%- endif -%}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{{- '### Response:\\n' ~ message['content'] ~ (eos_token or '') -}}"
            "{%- if not loop.last or add_generation_prompt -%}{{- '\\n\\n' -}}{%- endif -%}"
            "{%- else -%}"
            "{{- raise_exception('alpaca template: unsupported role ' ~ message['role'] ~ "
            "' (system only as the first message)') -}}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
        )

    def ollama_template(self, tokenizer: PreTrainedTokenizerBase) -> str:
        """The single-turn prompt in Ollama's Go template syntax (`.System`, `.Prompt`, `.Response`)."""
        eos = tokenizer.eos_token or ""
        return (
            f"{{{{ if .System }}}}{{{{ .System }}}}{{{{ else }}}}{self.PREAMBLE}{{{{ end }}}}\n\n"
            f"### Instruction:\n{{{{ .Prompt }}}}\n\n### Response:\n{{{{ .Response }}}}{eos}"
        )


class ChatMLTemplate(PromptTemplate):
    """`<|im_start|>role\\ncontent<|im_end|>\\n` turns (Qwen, SmolLM, ...); trains on `content<|im_end|>`."""

    name = "chatml"

    def render(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
        segments: list[Segment] = []
        for message in messages:
            header = f"<|im_start|>{message['role']}\n"
            if message["role"] == "assistant":
                segments += [(header, False), (f"{message_text(message)}<|im_end|>", True), ("\n", False)]
            else:
                segments.append((f"{header}{message_text(message)}<|im_end|>\n", False))
        return _merge(segments)

    def chat_template(self, tokenizer: PreTrainedTokenizerBase) -> str | None:
        return (
            "{%- for message in messages -%}"
            f"{{{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ {_JINJA_TEXT} ~ '<|im_end|>\\n' -}}}}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
        )


class Llama2Template(PromptTemplate):
    """Llama 2 chat: `<s>[INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nuser [/INST] reply </s>`, turn after turn.

    Writes the tokenizer's BOS/EOS itself, as Meta's format puts one pair around every exchange.
    """

    name = "llama2"
    add_special_tokens = False

    def render(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
        bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
        turns = list(messages)
        system = str(turns.pop(0)["content"]).strip() if turns and turns[0]["role"] == "system" else None
        segments: list[Segment] = []
        for index, turn in enumerate(turns):
            expected = "user" if index % 2 == 0 else "assistant"
            if turn["role"] != expected:
                raise TemplateError(
                    f"llama2 template: roles must alternate user/assistant after an optional system message; "
                    f"message {index + 1} is {turn['role']!r}"
                )
            content = message_text(turn).strip()
            if expected == "assistant":
                segments.append((f" {content} {eos}", True))
                continue
            if index == 0 and system:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            segments.append((f"{bos}[INST] {content} [/INST]", False))
        return _merge(segments)

    def chat_template(self, tokenizer: PreTrainedTokenizerBase) -> str | None:
        return (
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = messages[0]['content'] | trim -%}{%- set turns = messages[1:] -%}"
            "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
            "{%- for message in turns -%}"
            "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
            "{{- raise_exception('llama2 template: roles must alternate user/assistant after an optional system "
            "message') -}}"
            "{%- endif -%}"
            f"{{%- set content = ({_JINJA_TEXT}) | trim -%}}"
            "{%- if message['role'] == 'assistant' -%}{{- ' ' ~ content ~ ' ' ~ (eos_token or '') -}}"
            "{%- else -%}"
            "{%- if loop.first and system -%}"
            "{%- set content = '<<SYS>>\\n' ~ system ~ '\\n<</SYS>>\\n\\n' ~ content -%}"
            "{%- endif -%}"
            "{{- (bos_token or '') ~ '[INST] ' ~ content ~ ' [/INST]' -}}"
            "{%- endif -%}"
            "{%- endfor -%}"
        )


class TokenizerChatTemplate(PromptTemplate):
    """The tokenizer's own chat template (`tokenizer.apply_chat_template`).

    Assistant spans are found by rendering the conversation incrementally: the text up to each assistant
    turn with the generation prompt, then with the turn; the difference is the reply plus its end-of-turn
    token (trailing whitespace between turns stays untrained). A template that does not render
    conversations as growing prefixes (for example one that rewrites earlier turns) is refused.
    """

    name = "tokenizer"
    add_special_tokens = False  # apply_chat_template's text already holds every special token it wants

    def render(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
        chat = [{"role": message["role"], "content": message_text(message)} for message in messages]
        if not chat:
            return []
        segments: list[Segment] = []
        done = ""  # rendered text covered by `segments` so far
        for index, message in enumerate(chat):
            if message["role"] != "assistant":
                continue
            if index == 0:
                raise TemplateError(
                    "the conversation starts with an assistant message; there is no prompt for it"
                )
            before = self._apply(tokenizer, chat[:index], add_generation_prompt=True)
            after = self._apply(tokenizer, chat[: index + 1], add_generation_prompt=False)
            if not before.startswith(done) or not after.startswith(before):
                raise TemplateError(
                    f"the tokenizer's chat template does not render this conversation as growing prefixes "
                    f"(at message {index + 1}), so the assistant replies cannot be located; "
                    "set template_name to an explicit template such as 'chatml'"
                )
            reply = after[len(before) :]
            trained = reply.rstrip()
            segments += [(before[len(done) :], False), (trained, True), (reply[len(trained) :], False)]
            done = after
        if chat[-1]["role"] != "assistant":
            full = self._apply(tokenizer, chat, add_generation_prompt=False)
            if not full.startswith(done):
                raise TemplateError(
                    "the tokenizer's chat template rewrites earlier turns of this conversation"
                )
            segments.append((full[len(done) :], False))
        return _merge(segments)

    def generation_prompt(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> str:
        chat = [{"role": message["role"], "content": message_text(message)} for message in messages]
        return self._apply(tokenizer, chat, add_generation_prompt=True)

    def chat_template(self, tokenizer: PreTrainedTokenizerBase) -> str | None:
        return getattr(tokenizer, "chat_template", None)

    def chat_messages(self, messages: Sequence[Message]) -> list[dict[str, Any]]:
        return [{"role": message["role"], "content": message_text(message)} for message in messages]

    @staticmethod
    def _apply(
        tokenizer: PreTrainedTokenizerBase, chat: list[dict[str, str]], add_generation_prompt: bool
    ) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                f"template 'tokenizer': tokenizer {tokenizer.name_or_path!r} has no chat template; "
                "set template_name to 'chatml', 'llama2' or 'alpaca'"
            )
        return tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=add_generation_prompt
        )


class TemplateRegistry:
    """Templates by name."""

    def __init__(self) -> None:
        self._templates: dict[str, PromptTemplate] = {}

    def register(self, name: str, template: PromptTemplate, *, overwrite: bool = False) -> None:
        """Make `template` available as `name` (for `template_name` in configs)."""
        if not isinstance(template, PromptTemplate):
            raise TypeError(f"template {name!r} must be a PromptTemplate, got {type(template).__name__}")
        if name in self._templates and not overwrite:
            raise ValueError(
                f"a template named {name!r} is already registered; pass overwrite=True to replace it"
            )
        self._templates[name] = template

    def get(self, name: str) -> PromptTemplate:
        """The template registered as `name`; an unknown name raises `TemplateError` listing known ones."""
        if name not in self._templates:
            raise TemplateError(f"unknown template {name!r}; known templates: {', '.join(self.names())}")
        return self._templates[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._templates)

    def __contains__(self, name: object) -> bool:
        return name in self._templates


default_registry = TemplateRegistry()
"""The registry `template_name` is looked up in."""
for _template in (AlpacaTemplate(), ChatMLTemplate(), Llama2Template(), TokenizerChatTemplate()):
    default_registry.register(_template.name, _template)
del _template


_SAMPLE_CONVERSATION: list[Message] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
]


class _PlaceholderTokenizer:
    """Stands in for a tokenizer where only its special tokens are read (`sft templates` without a model)."""

    bos_token = "<s>"
    eos_token = "</s>"
    name_or_path = "(no model)"
    chat_template = None


def describe_templates(tokenizer: PreTrainedTokenizerBase | None = None) -> list[tuple[str, str]]:
    """Each registered template with a one-line rendering of a short conversation (trained text in `[...]`,
    line breaks as `\\n`). Without `tokenizer`, `<s>`/`</s>` stand for its BOS/EOS tokens and the `tokenizer`
    template (which needs a real chat template) says so."""
    rows = []
    for name in default_registry.names():
        template = default_registry.get(name)
        try:
            segments = template.render(_SAMPLE_CONVERSATION, tokenizer or _PlaceholderTokenizer())  # type: ignore[arg-type]
        except TemplateError as error:
            rows.append((name, f"({error})" if tokenizer is not None else "(the model's own chat template; "
                         "see it with: sft templates --model MODEL)"))
            continue
        text = "".join(f"[{part}]" if trained else part for part, trained in segments)
        rows.append((name, text.replace("\n", "\\n")))
    return rows


# ------------------------------------------------------------------------------- the chat template to save

_PROBES: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "what is the capital of france ?"},
                  {"role": "assistant", "content": "paris ."}]},
    {"messages": [{"role": "system", "content": "be brief ."}, {"role": "user", "content": "hello"},
                  {"role": "assistant", "content": "hi !"}, {"role": "user", "content": "what is one plus two ?"},
                  {"role": "assistant", "content": "three"}]},
    {"instruction": "translate", "input": "hello world", "output": "hallo welt"},
]
"""Conversations the saved chat template must render as training did (a system turn, several turns, an alpaca
`input`); those a template cannot render are skipped."""


def chat_template_for(template: PromptTemplate | None, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The Jinja chat template to save with `tokenizer` so that chat renders prompts exactly as training did.

    For every probe conversation, `apply_chat_template(messages[:-1], add_generation_prompt=True)` must give,
    token for token, the prompt prefix the training data had before the last reply. The template's own Jinja
    (`PromptTemplate.chat_template`, with the special tokens the tokenizer adds written in front) is tried
    first, then the tokenizer's current chat template. None for plain-text (completion) training. Raises
    `TemplateError` when neither matches: saving a tokenizer that chats in another format is an error.
    """
    if template is None:
        return None
    own = template.chat_template(tokenizer)
    candidates = []
    if own is not None:
        candidates.append(_leading_specials(tokenizer) + own if template.add_special_tokens else own)
    current = getattr(tokenizer, "chat_template", None)
    if isinstance(current, str) and current not in candidates:
        candidates.append(current)
    problem = "it has no Jinja form (its chat_template() returns None) and the tokenizer has no chat template"
    for candidate in candidates:
        problem = _parity_problem(template, tokenizer, candidate)
        if problem is None:
            return candidate
    raise TemplateError(
        f"template {template.name!r}: no chat template to save renders prompts as training did ({problem}); "
        "chat with the saved model would use another format. Give the template a chat_template() method that "
        "returns equivalent Jinja"
    )


def _leading_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before a text (a BOS)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    return full[: full.index(plain[0])] if plain and plain[0] in full else []


def _leading_specials(tokenizer: PreTrainedTokenizerBase) -> str:
    """Jinja for the special tokens the tokenizer puts before a text (a BOS), which a chat template must write."""
    tokens = tokenizer.convert_ids_to_tokens(_leading_ids(tokenizer))
    return "".join("{{- bos_token -}}" if token == tokenizer.bos_token else f"{{{{- {json.dumps(token)} -}}}}"
                   for token in tokens)


def _parity_problem(template: PromptTemplate, tokenizer: PreTrainedTokenizerBase, jinja: str) -> str | None:
    """Why `jinja` does not reproduce the training prompt of some probe (None: it does for every one).

    The training prompt is the rendered text before the last reply, tokenized as training tokenizes (with the
    special tokens the tokenizer adds in front): the trained prompt prefix token for token, except where a token
    spans prompt and reply (which the audit's `prompt_reply_boundary` check reports).
    """
    import jinja2

    lead = _leading_ids(tokenizer) if template.add_special_tokens else []
    for probe in _PROBES:
        messages = probe["messages"] if "messages" in probe else [
            {"role": "user", "content": probe["instruction"], "input": probe["input"]},
            {"role": "assistant", "content": probe["output"]}]
        try:
            segments = template.render(messages, tokenizer)
        except (ValueError, KeyError, jinja2.TemplateError):  # TemplateError is a ValueError
            continue  # a conversation this template does not render
        replies = [i for i, (_, trained) in enumerate(segments) if trained]
        if not replies:
            continue
        prompt = "".join(text for text, _ in segments[: replies[-1]])
        trained_prefix = lead + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        try:
            text = tokenizer.apply_chat_template(template.chat_messages(messages[:-1]), chat_template=jinja,
                                                 add_generation_prompt=True, tokenize=False)
        except (jinja2.TemplateError, TemplateError, ValueError) as error:
            return f"the chat template fails on {messages[:-1]!r}: {error}"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids != trained_prefix:
            return (f"for {messages[:-1]!r} the chat template gives {tokenizer.decode(ids)!r}, training had "
                    f"{tokenizer.decode(trained_prefix)!r}")
    return None
