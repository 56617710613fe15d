"""The data and template audit: each silent mistake stops the run (or warns once), naming the check and its rows;
the figures are right; the saved tokenizer chats exactly as training rendered; validate/preview/report show it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from _data_helpers import bpe_tokenizer
from helpers import build_tiny_tokenizer, tiny_llama, write_jsonl
from transformers import AutoTokenizer

from app.sft import SFTConfig, SFTTrainer
from app.sft.audit import AuditError, AuditWarning, audit_data
from app.sft.cli import main
from app.sft.data import IGNORE_INDEX, DataWarning, tokenize_dataset, tokenize_example
from app.sft.generation import Generator
from app.sft.modeling import load_tokenizer, save_final_model
from app.sft.templates import (
    AlpacaTemplate,
    ChatMLTemplate,
    PromptTemplate,
    TemplateError,
    chat_template_for,
    default_registry,
)

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
ROWS = [{"instruction": f"what is {NUMBERS[a]} plus {NUMBERS[b]} ?", "output": NUMBERS[a + b]}
        for a in range(4) for b in range(4)]
"""16 distinct alpaca rows the tiny tokenizer knows every word of."""


class MaskedEos(ChatMLTemplate):
    """ChatML whose end-of-turn token after each reply is left untrained (the model would never stop)."""

    name = "test_masked_eos"

    def render(self, messages, tokenizer):  # type: ignore[no-untyped-def]
        segments = []
        for text, trained in super().render(messages, tokenizer):
            if trained:
                segments += [(text.removesuffix("<|im_end|>"), True), ("<|im_end|>", False)]
            else:
                segments.append((text, False))
        return segments


class JoinedMarker(PromptTemplate):
    """`Question: ...\\nAnswer: ` + reply: the marker's trailing space merges with the reply's first word."""

    name = "test_joined_marker"

    def render(self, messages, tokenizer):  # type: ignore[no-untyped-def]
        question, answer = (message["content"] for message in messages)
        return [(f"Question: {question}\nAnswer: ", False), (answer + tokenizer.eos_token, True)]

    def chat_template(self, tokenizer):  # type: ignore[no-untyped-def]
        return "{{- 'Question: ' ~ messages[0]['content'] ~ '\\nAnswer: ' -}}"


class BosChatML(ChatMLTemplate):
    """ChatML that writes the BOS itself while the tokenizer adds one too."""

    name = "test_bos_chatml"

    def render(self, messages, tokenizer):  # type: ignore[no-untyped-def]
        return [(tokenizer.bos_token, False), *super().render(messages, tokenizer)]

    def chat_template(self, tokenizer):  # type: ignore[no-untyped-def]
        return "{{- bos_token -}}" + super().chat_template(tokenizer)


class NoJinja(AlpacaTemplate):
    """An alpaca-like template with no Jinja form."""

    name = "test_no_jinja"

    def chat_template(self, tokenizer):  # type: ignore[no-untyped-def]
        return None


@pytest.fixture(autouse=True)
def _test_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bad templates, registered for template_name during each test only."""
    for template in (MaskedEos(), JoinedMarker(), BosChatML()):
        monkeypatch.setitem(default_registry._templates, template.name, template)


def bpe_rows() -> list[dict[str, str]]:
    questions = ["What is the capital of France?", "Translate to German: good morning.", "Hello there, how are you?",
                 "Count from one to five."]
    answers = ["Paris.", "Guten Morgen!", "I am fine, thanks.", "1, 2, 3, 4, 5."]
    return [{"instruction": q, "output": a} for q, a in zip(questions, answers, strict=True)]


def truncated_rows() -> list[dict[str, str]]:
    """10 rows; rows 2, 5 and 8 have a 30-word response that max_seq_length 16 cuts."""
    rows = [dict(row) for row in ROWS[:10]]
    for index in (1, 4, 7):
        rows[index]["output"] = " ".join(NUMBERS[i % 11] for i in range(30))
    return rows


# name -> (config overrides, tokenizer factory, train rows, eval rows, expected check, expected text in message)
BAD_INPUT: dict[str, tuple[dict[str, Any], Any, list, list | None, str, str]] = {
    "template masks the EOS": (
        {"template_name": MaskedEos.name}, build_tiny_tokenizer, ROWS, None, "end_of_reply_trained",
        "16 rows (train_dataset rows 1, 2, 3, 4, 5, ...): the EOS / end-of-turn token that ends an assistant reply "
        "carries no label"),
    "marker merges with the first reply token": (
        {"template_name": JoinedMarker.name}, bpe_tokenizer, bpe_rows(), None, "prompt_reply_boundary",
        "4 rows (train_dataset rows 1, 2, 3, 4): a token spans the boundary between prompt and reply"),
    "tokenizer and template both add BOS": (
        {"template_name": BosChatML.name}, lambda: bpe_tokenizer(add_bos=True), bpe_rows(), None, "single_bos",
        "4 rows (train_dataset rows 1, 2, 3, 4): the row starts with two BOS tokens"),
    "30% of responses cut by max_seq_length": (
        {"template_name": "chatml", "max_seq_length": 16}, build_tiny_tokenizer, truncated_rows(), None,
        "truncation", "3 rows truncated (train_dataset rows 2, 5, 8): max_seq_length=16 cuts"),
    "special tokens typed in the data": (
        {}, build_tiny_tokenizer, [*ROWS[:1], {"instruction": "add one", "output": "two <|im_end|>\n<|im_start|>"
                                               "user\nsay yes"}, *ROWS[2:4], {"instruction": "<|im_start|>"
                                               "assistant\nhi", "output": "hello"}, *ROWS[5:]], None,
        "special_tokens_in_text",
        "2 rows (train_dataset rows 2, 5): the text holds a special token of the tokenizer (row 2: '<|im_end|>')"),
    "every reply is empty": (
        {}, build_tiny_tokenizer, [{**row, "output": ""} for row in ROWS], None, "empty_replies",
        "train_dataset: all 16 replies are empty"),
    "validation set copied from training": (
        {}, build_tiny_tokenizer, ROWS, ROWS, "validation_leakage",
        "16 of 16 validation rows (100.0%, eval_dataset rows 1, 2, 3, 4, 5, ...) are identical to training rows"),
}


BASE_SETTINGS = {
    "base_model": "unused", "max_seq_length": 64, "batch_size": 4, "max_steps": 1, "learning_rate": 1e-2,
    "validation_split": 0.0, "logging_steps": 1, "save_steps": 1, "eval_steps": 1, "warmup_ratio": 0.0,
    "disable_progress_bar": True, "use_lora": False,
}


def trainer_for(tmp_path: Path, case: str, **overrides: Any) -> SFTTrainer:
    settings, make_tokenizer, rows, eval_rows, _, _ = BAD_INPUT[case]
    tokenizer = make_tokenizer()
    config = SFTConfig(**{**BASE_SETTINGS, "output_dir": str(tmp_path / "out"), **settings, **overrides})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # the truncation case also warns while tokenizing
        return SFTTrainer(config, model=tiny_llama(vocab_size=len(tokenizer)), tokenizer=tokenizer,
                          train_dataset=rows, eval_dataset=eval_rows)


def files_under(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_each_silent_mistake_stops_the_run_before_anything_is_trained_or_written(tmp_path: Path, case: str) -> None:
    trainer = trainer_for(tmp_path, case)
    earlier = tmp_path / "out" / "checkpoints" / "checkpoint_step_3"  # what an earlier run left
    earlier.mkdir(parents=True)
    (earlier / "model.safetensors").write_bytes(b"earlier weights")
    (tmp_path / "out" / "metrics.jsonl").write_text('{"type": "train", "step": 3}\n')
    before_files = files_under(tmp_path / "out")
    before_weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    _, _, _, _, check, text = BAD_INPUT[case]
    with pytest.raises(AuditError) as caught:
        trainer.train()
    message = str(caught.value)
    assert f"  {check}: " in message and text in message, message
    assert message.startswith("data audit: 1 check failed (nothing was trained)")
    assert "audit: warn" in message
    assert trainer.global_step == 0
    assert all(torch.equal(before_weights[k], v) for k, v in trainer.model.state_dict().items())
    assert files_under(tmp_path / "out") == before_files


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_audit_warn_trains_with_one_warning_and_the_summary_keeps_the_finding(tmp_path: Path, case: str) -> None:
    trainer = trainer_for(tmp_path, case, audit="warn")
    _, _, _, _, check, text = BAD_INPUT[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = trainer.train()
    audit_warnings = [w for w in caught if issubclass(w.category, AuditWarning)]
    assert len(audit_warnings) == 1
    assert f"  {check}: " in str(audit_warnings[0].message) and text in str(audit_warnings[0].message)
    assert summary["global_step"] == 1
    saved = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert saved["audit"] == summary["audit"]
    assert not saved["audit"]["passed"]
    assert [c["name"] for c in saved["audit"]["checks"] if not c["passed"]] == [check]


def test_audit_off_skips_it(tmp_path: Path) -> None:
    summary = trainer_for(tmp_path, "validation set copied from training", audit="off").train()
    assert summary["audit"] is None and summary["global_step"] == 1


def test_clean_data_passes_and_the_figures_are_exact() -> None:
    """ChatML on the word-level tokenizer: `user`-turn rows of 6 prompt tokens, replies of n words + <|im_end|>."""
    tokenizer = build_tiny_tokenizer()
    rows = [{"instruction": "hello", "output": "one two"}, {"instruction": "hi", "output": " ".join(["three"] * 20)},
            {"instruction": "say", "output": "four"}, {"instruction": "tell", "output": "five six seven"}]
    with pytest.warns(DataWarning):
        train = tokenize_dataset(rows, tokenizer, template=default_registry.get("chatml"), max_seq_length=16,
                                 source="d.jsonl")
    config = SFTConfig(base_model="m", max_seq_length=16, batch_size=2, audit_max_truncated_share=0.5)
    report = audit_data(train, None, config, tokenizer)
    assert [check.name for check in report.checks if not check.passed] == []
    # responses (trained tokens after the first position): 3, 21, 2, 4; the long row keeps 16 - 6 = 10
    assert report.truncation == {"rows": 1, "rows_share": 0.25, "trained_tokens_lost": 11,
                                 "trained_tokens_lost_share": 11 / 30, "rows_response_cut_away": 0}
    assert report.lengths["prompt"]["max"] == 6 and report.lengths["total"]["max"] == 27
    assert report.splits["train"]["tokens"] == 9 + 16 + 8 + 10
    assert report.splits["train"]["trained_tokens"] == 3 + 10 + 2 + 4
    assert report.batching["steps_per_epoch"] == 2 and 0 < report.batching["padding_share"] < 1
    assert json.loads(report.to_json()) == report.to_dict()
    assert report.examples[1]["truncated"] and report.examples[1]["row"] == 2
    # a reply cut away entirely fails even under a generous share
    config = SFTConfig(base_model="m", max_seq_length=16, audit_max_truncated_share=1.0)
    rows.append({"instruction": " ".join(["hello"] * 20), "output": "one"})
    with pytest.warns(DataWarning):
        train = tokenize_dataset(rows, tokenizer, template=default_registry.get("chatml"), max_seq_length=16,
                                 source="d.jsonl")
    (failed,) = audit_data(train, None, config).failed
    assert failed.name == "truncation" and "1 rows lose their whole response (d.jsonl row 5)" in failed.message


def test_a_validation_split_of_distinct_rows_shows_no_leakage() -> None:
    tokenizer = build_tiny_tokenizer()
    data = tokenize_dataset(ROWS, tokenizer)
    train, val = data.select(range(12)), data.select(range(12, 16))
    report = audit_data(train, val, SFTConfig(base_model="m"), tokenizer)
    assert report.leakage["duplicate_validation_rows"] == 0 and not report.failed
    report = audit_data(train, data.select([0, 13]), SFTConfig(base_model="m"), tokenizer)
    (failed,) = report.failed
    assert failed.name == "validation_leakage" and failed.first_rows == [1]


def test_a_share_of_empty_replies_warns_once_and_trains(tmp_path: Path) -> None:
    rows = [{**row, "output": ""} if index in (3, 9) else row for index, row in enumerate(ROWS)]
    tokenizer = build_tiny_tokenizer()
    report = audit_data(tokenize_dataset(rows, tokenizer, source="d.jsonl"), None, SFTConfig(base_model="m"))
    assert not report.failed
    (warning,) = report.warnings
    assert warning.name == "empty_replies" and warning.first_rows == [4, 10]
    assert "2 of 16 replies (12.5%, d.jsonl rows 4, 10) are empty" in warning.message
    assert report.to_dict()["passed"]
    config = SFTConfig(**{**BASE_SETTINGS, "output_dir": str(tmp_path / "out")})
    trainer = SFTTrainer(config, model=tiny_llama(vocab_size=len(tokenizer)), tokenizer=tokenizer, train_dataset=rows)
    with pytest.warns(AuditWarning, match=r"empty_replies: 2 of 16 replies") as caught:
        assert trainer.train()["global_step"] == 1
    assert len([w for w in caught if issubclass(w.category, AuditWarning)]) == 1
    page = (tmp_path / "out" / "report.html").read_text()
    assert '<th>empty_replies</th><td class="fail">warning</td>' in page


def test_special_tokens_in_text_names_the_token_and_plain_text_passes() -> None:
    tokenizer = build_tiny_tokenizer()
    chat = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "say <unk> please"}, {"role": "assistant", "content": "no"}]}]
    data = tokenize_dataset(chat, tokenizer, dataset_format="chat", source="c.jsonl")
    (failed,) = audit_data(data, None, SFTConfig(base_model="m", dataset_format="chat")).failed
    assert failed.name == "special_tokens_in_text" and failed.first_rows == [2] and "'<unk>'" in failed.message
    plain = tokenize_dataset(ROWS, tokenizer)  # the template's own markers are not data
    assert not audit_data(plain, None, SFTConfig(base_model="m")).failed


def test_the_tools_own_split_of_a_file_with_copies_passes_and_counts_them(tmp_path: Path) -> None:
    """Scraped data repeats rows: the validation_split keeps copies together, so the leakage check passes."""
    from app.sft.data import build_datasets

    rows = ROWS + ROWS[:4] + ROWS[:2]  # rows 1-2 three times, rows 3-4 twice
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    config = SFTConfig(base_model="m", dataset_name=str(path), validation_split=0.25, cache_tokenized=False)
    tokenizer = build_tiny_tokenizer()
    train, val = build_datasets(config, tokenizer)
    report = audit_data(train, val, config, tokenizer)
    assert not report.failed
    assert report.leakage["duplicate_validation_rows"] == 0
    assert report.leakage["duplicates_kept_together"] == 3 + 3 + 2 + 2
    assert "10 copies of rows kept on one side of the split" in report.format_table()


# ------------------------------------------------------------------------------------------- template parity

CONVERSATIONS = [
    [{"role": "user", "content": "what is the capital of france ?"}, {"role": "assistant", "content": "paris"}],
    [{"role": "system", "content": "be brief ."}, {"role": "user", "content": "hello"},
     {"role": "assistant", "content": "hi"}, {"role": "user", "content": "what is one plus two ?"},
     {"role": "assistant", "content": "three"}],
]


def trained_prompt_prefix(example: dict[str, list[int]]) -> list[int]:
    """The tokens before the last reply's first trained token."""
    labels = example["labels"]
    start = max(i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX)
    return example["input_ids"][:start]


@pytest.mark.parametrize("template_name", ["alpaca", "chatml", "llama2", "tokenizer"])
def test_the_saved_tokenizer_chats_in_the_trained_format(tmp_path: Path, tiny_model_dir: Path,
                                                         template_name: str) -> None:
    """Train, save (adapter and merged/), load: the saved chat template gives the trained prompt prefix."""
    config = SFTConfig(
        base_model=str(tiny_model_dir), dataset_name=str(write_jsonl(tmp_path / "chat.jsonl", [
            {"messages": conversation} for conversation in CONVERSATIONS * 2])),
        dataset_format="chat", template_name=template_name, output_dir=str(tmp_path / "run"), max_steps=1,
        batch_size=2, validation_split=0.0, save_steps=100, disable_progress_bar=True, use_lora=True,
        lora_target_modules=["q_proj", "v_proj"], save_merged_model=True,
    )
    SFTTrainer(config).train()
    base = load_tokenizer(config)
    template = default_registry.get(template_name)
    for out in (tmp_path / "run", tmp_path / "run" / "merged"):
        saved = AutoTokenizer.from_pretrained(out)
        for conversation in CONVERSATIONS:
            example = tokenize_example({"messages": conversation}, base, dataset_format="chat", template=template)
            prompt = saved.apply_chat_template(template.chat_messages(conversation[:-1]), add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
            assert prompt == trained_prompt_prefix(example), (out, conversation)
        if template_name == "alpaca":  # a template the chat model's own cannot express is saved as Jinja
            assert "### Instruction:" in saved.chat_template and saved.chat_template != base.chat_template
        else:
            assert "### Instruction:" not in saved.chat_template
    generator = Generator(tiny_llama(), AutoTokenizer.from_pretrained(tmp_path / "run"), config, use_chat_template=True)
    assert generator.use_chat_template
    example = tokenize_example({"messages": CONVERSATIONS[1]}, base, dataset_format="chat", template=template)
    ids = generator._encode(generator.prompt_text(CONVERSATIONS[1][:-1]))["input_ids"][0].tolist()
    assert ids == trained_prompt_prefix(example)


@pytest.mark.parametrize("template_name", ["alpaca", "chatml"])
def test_the_saved_chat_template_writes_the_bos_the_tokenizer_adds(template_name: str) -> None:
    tokenizer = bpe_tokenizer(add_bos=True)
    template = default_registry.get(template_name)
    jinja = chat_template_for(template, tokenizer)
    messages = [{"role": "user", "content": "Translate to German.", "input": "good morning"}]
    ids = tokenizer.apply_chat_template(messages, chat_template=jinja, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    example = tokenize_example({"instruction": "Translate to German.", "input": "good morning", "output": "Guten"},
                               tokenizer, template=template)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids == trained_prompt_prefix(example)


def test_a_template_with_no_chat_form_is_an_error_at_save_time_and_writes_nothing(tmp_path: Path) -> None:
    tokenizer = build_tiny_tokenizer()  # its own chat template is ChatML, not alpaca
    out = tmp_path / "final"
    with pytest.raises(TemplateError, match=r"template 'test_no_jinja': no chat template to save renders prompts "
                                            r"as training did \(for \[\{'role': 'user'"):
        save_final_model(tiny_llama(), tokenizer, out, template=NoJinja())
    assert not out.exists()


# ------------------------------------------------------------------------------------------- command line


def write_config(tmp_path: Path, model_dir: Path, train: list, val: list | None = None, **settings: Any) -> Path:
    import yaml

    config = {"base_model": str(model_dir), "dataset_name": str(write_jsonl(tmp_path / "train.jsonl", train)),
              "validation_split": 0.0, "max_seq_length": 64, "output_dir": str(tmp_path / "run"), **settings}
    if val is not None:
        config["eval_dataset_name"] = str(write_jsonl(tmp_path / "val.jsonl", val))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_validate_prints_the_audit_table_and_json_and_fails_on_a_failed_check(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clean = write_config(tmp_path, tiny_model_dir, ROWS[:12], ROWS[12:])
    assert main(["validate", str(clean)]) == 0
    out = capsys.readouterr().out
    assert "Data audit (" in out and "trained tokens per epoch" in out and "p99" in out
    assert "ok   end_of_reply_trained" in out and "ok   validation_leakage" in out
    assert main(["validate", str(clean), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["splits"]["validation"]["examples"] == 4
    copied = write_config(tmp_path, tiny_model_dir, ROWS, ROWS)
    assert main(["validate", str(copied), "--json"]) == 2
    captured = capsys.readouterr()
    assert not json.loads(captured.out)["passed"]
    assert "sft validate: error: data audit: 1 check failed" in captured.err
    assert "validation_leakage: 16 of 16 validation rows" in captured.err
    assert main(["validate", str(copied), "--set", "audit=warn"]) == 0
    assert "FAIL validation_leakage" in capsys.readouterr().out
    assert main(["train", str(copied)]) == 2  # one message, no traceback, nothing written
    err = capsys.readouterr().err
    assert "sft train: error: data audit: 1 check failed (nothing was trained)" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() or files_under(tmp_path / "run") == {}  # at most an empty checkpoints/


def test_pretokenized_training_keeps_the_tokenizers_own_chat_template(tmp_path: Path) -> None:
    tokenizer = build_tiny_tokenizer()
    rows = [{"input_ids": example["input_ids"], "labels": example["labels"]}
            for example in tokenize_dataset(ROWS, tokenizer, template=default_registry.get("chatml"))]
    config = SFTConfig(base_model="unused", output_dir=str(tmp_path / "out"), max_steps=1, batch_size=4,
                       validation_split=0.0, disable_progress_bar=True, use_lora=False)  # dataset_format: alpaca
    SFTTrainer(config, model=tiny_llama(), tokenizer=tokenizer, train_dataset=rows).train()
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == tokenizer.chat_template


def test_preview_marks_truncation(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, tiny_model_dir, truncated_rows()[:2], template_name="chatml", max_seq_length=16)
    assert main(["preview", str(config), "-n", "2"]) == 0
    out = capsys.readouterr().out
    first, second = out.split("--- ")[1:]
    assert "truncated" not in first
    # 11 prompt tokens + 30 words + <|im_end|> = 42 tokens: 16 kept (5 trained), 26 cut (all trained)
    assert "16 tokens, 5 trained; truncated: max_seq_length cuts 26 more tokens, 26 of them trained" in second
    assert "[cut] truncated here by max_seq_length=16: 26 tokens (26 trained)" in second


def test_report_has_a_data_section(tmp_path: Path) -> None:
    with pytest.warns(AuditWarning, match="truncation"):
        trainer_for(tmp_path, "30% of responses cut by max_seq_length", audit="warn").train()
    page = (tmp_path / "out" / "report.html").read_text()
    data = page[page.index("<h2>Data</h2>"):]
    assert 'class="max-seq-length"' in data and "max_seq_length 16" in data
    assert "Trained tokens lost to truncation" in data and "FAILED" in data
    assert data.count('<pre class="example">') == 2 and '<span class="trained">' in data
    assert "(truncated to max_seq_length)" in data


def test_a_run_saved_without_a_matching_chat_template_keeps_its_prompts_from_the_template() -> None:
    """A tokenizer whose chat template is ChatML, from a run that trained with alpaca (saved before parity)."""
    tokenizer = build_tiny_tokenizer()
    config = SFTConfig(base_model="m", dataset_format="alpaca")
    generator = Generator(tiny_llama(), tokenizer, config, use_chat_template=True)
    assert not generator.use_chat_template
    assert generator.prompt_text("hello").endswith("### Response:\n")
    tokenizer.chat_template = chat_template_for(AlpacaTemplate(), tokenizer)
    assert Generator(tiny_llama(), tokenizer, config, use_chat_template=True).use_chat_template
