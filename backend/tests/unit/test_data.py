"""The data pipeline: loading files, row errors, label masks, truncation, splits, batch plans, collators."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from _data_helpers import bpe_tokenizer, trained_text

from app.sft.config import ConfigError, DatasetSource, SFTConfig
from app.sft.data import (
    DataError,
    DataWarning,
    PackedCollator,
    PaddedCollator,
    TokenizedDataset,
    build_datasets,
    epoch_batches,
    format_row,
    load_rows,
    resolve_template,
    split_train_val,
    tokenize_dataset,
    tokenize_example,
)
from app.sft.templates import PromptTemplate, default_registry

TOKENIZER = bpe_tokenizer()
ALPACA = [
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Translate to German.", "input": "good morning", "output": "Guten Morgen!"},
    {"instruction": "Count from one to five.", "input": "", "output": "1, 2, 3, 4, 5."},
]
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi! How are you?"},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@contextlib.contextmanager
def no_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        yield


# ------------------------------------------------------------------------------------------- loading


def test_every_local_format_loads_the_same_rows(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", ALPACA)
    (tmp_path / "array.json").write_text(json.dumps(ALPACA, indent=2))
    write_jsonl(tmp_path / "lines.json", ALPACA)  # JSON lines in a file named .json
    datasets.Dataset.from_list(ALPACA).to_csv(str(tmp_path / "data.csv"), index=False)
    datasets.Dataset.from_list(ALPACA).to_parquet(str(tmp_path / "data.parquet"))
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ALPACA[:1]), "test": datasets.Dataset.from_list(ALPACA)}
    ).save_to_disk(str(tmp_path / "saved_dict"))
    for name in ("data.jsonl", "array.json", "lines.json", "data.csv", "data.parquet", "saved"):
        rows = [
            {key: row[key] or "" for key in ("instruction", "input", "output")}
            for row in load_rows(str(tmp_path / name))
        ]
        assert rows == ALPACA, name
    assert len(load_rows(str(tmp_path / "saved_dict"), split="test")) == 3
    assert len(load_rows(str(tmp_path / "saved_dict"), split=("validation", "train"))) == 1
    with pytest.raises(DataError, match=r"saved_dict: no split 'validation'; available splits: train, test"):
        load_rows(str(tmp_path / "saved_dict"), split="validation")


def test_records_with_different_keys_keep_every_key(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}],
    )
    rows = list(load_rows(str(path)))
    assert rows == [
        {"instruction": "a", "output": "b", "input": None},
        {"instruction": "c", "output": "e", "input": "d"},
    ]


def test_missing_unsupported_and_empty_sources_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"Dataset file not found: .*nope\.jsonl"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: unsupported file type '\.txt'"):
        load_rows(str(tmp_path / "notes.txt"))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"blank\.jsonl: the dataset is empty"):
        load_rows(str(tmp_path / "blank.jsonl"))
    (tmp_path / "header.csv").write_text("instruction,output\n")
    with pytest.raises(DataError, match=r"header\.csv: the dataset is empty"):
        load_rows(str(tmp_path / "header.csv"))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match=r"empty\.json: the dataset is empty"):
        load_rows(str(tmp_path / "empty.json"))


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON \(Expecting value at column 32\)"):
        load_rows(str(path))
    path.write_text('{"instruction": "a", "output": "b"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object, got list"):
        load_rows(str(path))


def records_json(count: int) -> str:
    records = [
        {
            "id": f"r{i}",
            "conversations": [
                {"from": "human", "value": f'Q{i} "quoted"'},
                {"from": "gpt", "value": f"A{i}, true"},
            ],
        }
        for i in range(count)
    ]
    return json.dumps(records, indent=2)


@pytest.mark.parametrize(
    "cut_after",
    [
        '"value": "A2, tr',
        '"value": "A2',
        '"value": ',
        '"from": "gpt"',
        '"value": "Q2 \\"quo',
        '"id": "r2",\n    "conv',
        "\n  },\n  ",  # right after a comma: no partial record, but the array is not closed
    ],
)
def test_a_json_array_cut_off_mid_record_keeps_every_complete_record(tmp_path: Path, cut_after: str) -> None:
    text = records_json(4)
    third = text.index('"id": "r2"')
    cut = text.index(cut_after, third - 40) + len(cut_after)
    path = tmp_path / "sharegpt.json"
    path.write_text(text[:cut], encoding="utf-8")
    with pytest.warns(DataWarning) as caught:
        rows = load_rows(str(path))
    assert [row["id"] for row in rows] == ["r0", "r1"]
    (warning,) = caught
    ignored = len(text[:cut].encode()) - len(text[: text.index("{", third - 20)].encode())
    assert ignored >= 0
    assert str(warning.message).endswith(f"kept 2 complete records and ignored the last {ignored} bytes")
    assert "sharegpt.json: the JSON array is cut off" in str(warning.message)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('"id": "r1",', '"id": "r1" oops,', "invalid JSON (Expecting ',' delimiter"),
        ('},\n  {\n    "id": "r2"', '}\n  {\n    "id": "r2"', "expected ',' or ']' after a record"),
    ],
)
def test_a_broken_json_array_is_an_error_naming_the_line_not_a_truncation(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    text = records_json(4).replace(old, new)
    path = tmp_path / "broken.json"
    path.write_text(text)
    line = text[: text.index(new) + len(new) - len(new.lstrip("}\n ,"))].count("\n") + 1
    with pytest.raises(DataError) as excinfo:
        load_rows(str(path))
    assert str(excinfo.value).startswith(f"{path}:{line}: {message}")


def test_jsonl_strings_may_contain_unicode_line_separators(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "u.jsonl", [{"text": "one\u2028two\x85three"}, {"text": "four"}])
    path.write_text(path.read_text().replace("\\u2028", "\u2028").replace("\\u0085", "\x85"))
    assert "\u2028" in path.read_text()
    assert [row["text"] for row in load_rows(str(path))] == ["one\u2028two\x85three", "four"]


def test_csv_problems_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text('instruction,output\n"multi\nline",fine\nno output here\n')
    config = SFTConfig(base_model="m", dataset_name=str(path), validation_split=0)
    with pytest.raises(DataError, match=rf"^{path}:4: missing field 'output'"):
        build_datasets(config, TOKENIZER)
    path.write_text("instruction,output\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=rf"^{path}:3: more cells than the header has columns"):
        load_rows(str(path))


# ------------------------------------------------------------------------------------------- row errors


@pytest.mark.parametrize(
    ("fmt", "row", "message"),
    [
        ("alpaca", {"instruction": "a"}, "missing field 'output' (the row has 'instruction')"),
        ("alpaca", {"instruction": 3, "output": "b"}, "field 'instruction' must be a string, got int"),
        ("chat", {"text": "hi"}, "missing field 'messages' (or ShareGPT's 'conversations')"),
        ("chat", {"messages": "hi"}, "field 'messages' must be a list of messages, got str"),
        ("chat", {"messages": [{"role": "user"}]}, "messages[0]: field 'content' is missing"),
        ("chat", {"messages": [{"content": "x"}]}, "messages[0]: field 'role' is missing or not a string"),
        (
            "chat",
            {"conversations": [{"from": "robot", "value": "x"}]},
            "conversations[0]: unknown speaker 'robot' in field 'from' (expected human, gpt or system)",
        ),
        ("completion", {"body": "x"}, "missing field 'text' (the row has 'body')"),
    ],
)
def test_row_problems_name_the_file_line_and_field(
    tmp_path: Path, fmt: str, row: dict[str, Any], message: str
) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [row])
    path.write_text("\n" + path.read_text())  # a blank first line: the row is on line 2
    config = SFTConfig(base_model="m", dataset_name=str(path), dataset_format=fmt, validation_split=0)
    with pytest.raises(DataError) as excinfo:
        build_datasets(config, TOKENIZER)
    assert str(excinfo.value) == f"{path}:2: {message}"


def test_rows_of_in_memory_data_are_named_by_position() -> None:
    with pytest.raises(DataError, match=r"^my data row 2: missing field 'output'"):
        tokenize_dataset([ALPACA[0], {"instruction": "x"}], TOKENIZER, source="my data")


def test_sharegpt_conversations_are_detected_and_mapped() -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q"},
            {"from": "gpt", "value": "A"},
        ]
    }
    assert format_row(row, "chat") == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]


def test_conversations_without_reply_are_dropped_and_leading_replies_left_out_in_one_warning() -> None:
    rows = [
        {"conversations": [{"from": "human", "value": "Hello there"}]},  # no reply: dropped
        {"conversations": []},  # empty: dropped
        {
            "conversations": [
                {"from": "gpt", "value": "Guten Morgen!"},
                {"from": "human", "value": "Q"},
                {"from": "gpt", "value": "Paris."},
            ]
        },
        CHAT,
    ]
    with pytest.warns(DataWarning) as caught:
        data = tokenize_dataset(
            rows, TOKENIZER, dataset_format="chat", template=default_registry.get("chatml"), source="chats"
        )
    (warning,) = caught
    assert str(warning.message) == (
        "chats: dropped 2 of 4 examples (2 conversations with no assistant reply); left out the opening "
        "assistant message of 1 conversations (it came before any user message, so nothing prompted it)"
    )
    assert len(data) == 2 and data.num_dropped == 2
    assert trained_text(TOKENIZER, data[0]) == ["Paris.<|im_end|>"]
    assert "Guten" not in TOKENIZER.decode(data[0]["input_ids"])


# ------------------------------------------------------------------------------------------- masking


def test_alpaca_trains_only_on_the_response_and_eos() -> None:
    with no_warnings():
        data = tokenize_dataset(ALPACA, TOKENIZER, dataset_format="alpaca")
    for example, row in zip(data, ALPACA, strict=True):
        assert trained_text(TOKENIZER, example) == [row["output"] + "<|im_end|>"]
        prompt_length = example["labels"].index(next(label for label in example["labels"] if label != -100))
        assert TOKENIZER.decode(example["input_ids"][:prompt_length]).endswith("### Response:\n")
    assert "### Input:\ngood morning" in TOKENIZER.decode(data[1]["input_ids"])


@pytest.mark.parametrize("template_name", ["chatml", "llama2", "alpaca", "tokenizer"])
def test_multi_turn_chat_trains_only_on_assistant_replies(template_name: str) -> None:
    example = tokenize_example(
        CHAT, TOKENIZER, dataset_format="chat", template=default_registry.get(template_name)
    )
    assert example is not None
    replies = [message["content"] for message in CHAT["messages"] if message["role"] == "assistant"]
    runs = trained_text(TOKENIZER, example)
    assert [run.strip().removesuffix("<|im_end|>").strip() for run in runs] == replies
    assert all(run.rstrip().endswith("<|im_end|>") for run in runs)  # the end-of-turn token is learned
    # the end-of-turn token is also the pad token here, and is trained anyway
    assert TOKENIZER.pad_token_id in [label for label in example["labels"] if label != -100]


def test_tokens_are_those_of_the_whole_rendered_text() -> None:
    """The model is trained on exactly the tokens it will see at inference (no seams between segments)."""
    for template_name in ("chatml", "llama2", "tokenizer"):
        template = default_registry.get(template_name)
        example = tokenize_example(CHAT, TOKENIZER, dataset_format="chat", template=template)
        text = "".join(part for part, _ in template.render(CHAT["messages"], TOKENIZER))
        assert (
            example["input_ids"]
            == TOKENIZER(text, add_special_tokens=template.add_special_tokens)["input_ids"]
        )


class ColonPrompt(PromptTemplate):
    """A few-shot style template whose prompt ends with a space: `Question: ...\nAnswer: ` + reply."""

    name = "colon"

    def render(self, messages, tokenizer):  # type: ignore[no-untyped-def]
        question, answer = (message["content"] for message in messages)
        return [(f"Question: {question}\nAnswer: ", False), (answer + tokenizer.eos_token, True)]


@pytest.mark.parametrize("trim_offsets", [True, False])
def test_a_token_spanning_prompt_and_reply_is_trained(trim_offsets: bool) -> None:
    """`Answer: ` + `Paris.` tokenizes as `Answer`, `:`, ` Paris`, ...: the model must learn ` Paris`."""
    tokenizer = bpe_tokenizer(trim_offsets=trim_offsets)
    row = {"instruction": "What is the capital of France?", "output": "Paris."}
    example = tokenize_example(row, tokenizer, template=ColonPrompt())
    assert tokenizer.decode(example["input_ids"]).endswith("\nAnswer: Paris.<|im_end|>")
    assert trained_text(tokenizer, example) == [" Paris.<|im_end|>"]


def test_labels_match_the_chat_templates_own_generation_mask(tiny_tokenizer: Any) -> None:
    """Cross-check with transformers: the shared tiny tokenizer marks replies with {% generation %}."""
    example = tokenize_example(
        CHAT,
        tiny_tokenizer,
        dataset_format="chat",
        template=resolve_template(SFTConfig(base_model="m", dataset_format="chat"), tiny_tokenizer),
    )
    reference = tiny_tokenizer.apply_chat_template(
        CHAT["messages"], return_dict=True, return_assistant_tokens_mask=True
    )
    assert example["input_ids"] == reference["input_ids"]
    expected = [
        token if keep else -100
        for token, keep in zip(reference["input_ids"], reference["assistant_masks"], strict=True)
    ]
    assert example["labels"] == expected


def test_train_on_inputs_trains_every_token_and_completion_trains_the_text() -> None:
    example = tokenize_example(
        CHAT, TOKENIZER, dataset_format="chat", template=default_registry.get("chatml"), train_on_inputs=True
    )
    assert example["labels"] == example["input_ids"]
    completion = tokenize_example(
        {"body": "Hello there"}, TOKENIZER, dataset_format="completion", text_field="body"
    )
    assert TOKENIZER.decode(completion["input_ids"]) == "Hello there<|im_end|>"
    assert completion["labels"] == completion["input_ids"]
    with pytest.raises(ValueError, match="template 'chatml' is not used with dataset_format 'completion'"):
        tokenize_example(
            {"text": "x"}, TOKENIZER, dataset_format="completion", template=default_registry.get("chatml")
        )


def test_bos_is_added_once_as_the_tokenizer_would() -> None:
    tokenizer = bpe_tokenizer(add_bos=True)
    bos = tokenizer.bos_token_id
    alpaca = tokenize_example(ALPACA[0], tokenizer)
    assert (
        alpaca["input_ids"][0] == bos and alpaca["input_ids"].count(bos) == 1 and alpaca["labels"][0] == -100
    )
    llama2 = tokenize_example(CHAT, tokenizer, dataset_format="chat", template=default_registry.get("llama2"))
    assert llama2["input_ids"][:2] != [bos, bos] and llama2["input_ids"].count(bos) == 2  # one per exchange
    plain = tokenize_example(ALPACA[0], TOKENIZER)
    assert TOKENIZER.bos_token_id not in plain["input_ids"]


# ------------------------------------------------------------------------------------------- truncation


def test_truncation_and_drops_are_counted_in_one_warning() -> None:
    long_prompt = {"instruction": "Hello there, how are you today? " * 20, "output": "Fine."}
    prompt_tokens = len(tokenize_example(long_prompt, TOKENIZER, max_seq_length=10_000)["input_ids"])
    long_answer = {"instruction": "Hi", "output": "I am fine, thanks for asking. " * 20}
    with pytest.warns(DataWarning) as caught:
        data = tokenize_dataset(
            [ALPACA[0], long_prompt, long_answer],
            TOKENIZER,
            max_seq_length=prompt_tokens - 5,
            source="d.jsonl",
        )
    (warning,) = caught
    limit = prompt_tokens - 5
    assert str(warning.message) == (
        f"d.jsonl: dropped 1 of 3 examples (1 with no trained token within max_seq_length={limit}); "
        f"truncated 2 examples to max_seq_length={limit} tokens"
    )
    assert (len(data), data.num_dropped, data.num_truncated) == (2, 1, 2)
    assert data.lengths == [len(data[0]["input_ids"]), prompt_tokens - 5]


def test_nothing_left_is_an_error() -> None:
    with pytest.raises(DataError, match=r"^tiny: no usable examples; dropped 3 of 3 examples"):
        tokenize_dataset(ALPACA, TOKENIZER, max_seq_length=16, source="tiny")


def test_pretokenized_rows_pass_through_truncated_from_any_dataset_kind() -> None:
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, {"input_ids": [9, 10, 11]}]

    class Torchy(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            return {key: torch.tensor(value) for key, value in rows[index].items()}

    for source in (
        rows,
        datasets.Dataset.from_list(rows),
        Torchy(),
        TokenizedDataset([[5, 6, 7, 8], [9, 10, 11]], [[-100, -100, 7, 8], [9, 10, 11]]),
    ):
        with pytest.warns(DataWarning, match="truncated 1 examples"):
            data = tokenize_dataset(source, TOKENIZER, max_seq_length=3)
        assert [data[0], data[1]] == [
            {"input_ids": [5, 6, 7], "labels": [-100, -100, 7]},
            {"input_ids": [9, 10, 11], "labels": [9, 10, 11]},
        ]
    with pytest.raises(DataError, match="row 1: field 'labels' has 2 entries but 'input_ids' has 3"):
        tokenize_dataset([{"input_ids": [1, 2, 3], "labels": [1, 2]}], TOKENIZER)


# ------------------------------------------------------------------------------------ splits and config


def test_validation_split_is_deterministic_for_a_seed() -> None:
    rows = list(range(50))
    train, val = split_train_val(rows, 0.2, seed=7)
    assert (train, val) == split_train_val(rows, 0.2, seed=7)
    assert len(val) == 10 and sorted(train + val) == rows and train == sorted(train)
    assert split_train_val(rows, 0.2, seed=8)[1] != val
    assert split_train_val(rows, 0.0, seed=7) == (rows, None)
    with pytest.raises(DataError, match="validation_split=0.5 of 1 examples leaves nothing to train on"):
        split_train_val([1], 0.5, seed=0)


def test_identical_rows_go_to_the_same_side_of_the_split() -> None:
    """Copies of a row are never split between training and validation; the fraction stays close."""
    rows = [{"n": i} for i in range(40)] + [{"n": i} for i in range(0, 40, 3)] + [{"n": 7}] * 5
    for seed in range(5):
        train, val = split_train_val(rows, 0.2, seed=seed)
        assert not {json.dumps(row) for row in train} & {json.dumps(row) for row in val}
        assert sorted(map(json.dumps, train + val)) == sorted(map(json.dumps, rows))
        assert abs(len(val) - round(0.2 * len(rows))) <= 1
    with pytest.raises(DataError, match="every example is the same"):
        split_train_val([{"n": 1}] * 4, 0.25, seed=0)
    distinct = list(range(50))  # without copies, the split is the one a plain seeded permutation gives
    order = torch.randperm(50, generator=torch.Generator().manual_seed(7)).tolist()
    assert split_train_val(distinct, 0.2, seed=7)[1] == sorted(order[:10])


def test_build_datasets_splits_or_reads_the_eval_file(tmp_path: Path) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", ALPACA * 4)
    eval_file = write_jsonl(tmp_path / "eval.jsonl", ALPACA[:1])
    config = SFTConfig(base_model="m", dataset_name=str(train_file), validation_split=0.25, seed=3)
    train, val = build_datasets(config, TOKENIZER)
    assert (len(train), len(val)) == (8, 4)  # each row is there 4 times: its copies stay on one side
    assert [val[i] for i in range(4)] == [build_datasets(config, TOKENIZER)[1][i] for i in range(4)]
    train, val = build_datasets(config.with_overrides([f"eval_dataset_name={eval_file}"]), TOKENIZER)
    assert (len(train), len(val)) == (12, 1)
    train, val = build_datasets(config.with_overrides(["validation_split=0"]), TOKENIZER)
    assert (len(train), val) == (12, None)


def test_template_resolution_follows_the_config(tmp_path: Path) -> None:
    chat = SFTConfig(base_model="m", dataset_format="chat")
    assert resolve_template(chat, TOKENIZER).name == "tokenizer"
    assert resolve_template(chat, bpe_tokenizer(chat_template=None)).name == "chatml"
    assert resolve_template(SFTConfig(base_model="m"), TOKENIZER).name == "alpaca"
    assert resolve_template(SFTConfig(base_model="m", dataset_format="completion"), TOKENIZER) is None
    with pytest.raises(
        ConfigError, match="template_name: unknown template 'vicuna'; known templates: alpaca, chatml"
    ):
        resolve_template(chat.with_overrides(["template_name=vicuna"]), TOKENIZER)
    with pytest.raises(ConfigError, match="template_name: 'tokenizer' needs a chat template"):
        resolve_template(chat.with_overrides(["template_name=tokenizer"]), bpe_tokenizer(chat_template=None))
    with pytest.raises(ConfigError, match="dataset_name: required"):
        build_datasets(chat, TOKENIZER)


# ------------------------------------------------------------------------------------------- batching


def test_epoch_batches_is_a_deterministic_plan_covering_each_example_once() -> None:
    lengths = [5] * 10
    plan = epoch_batches(lengths, batch_size=3, epoch=1, seed=42)
    assert plan == epoch_batches(lengths, batch_size=3, epoch=1, seed=42)
    assert plan != epoch_batches(lengths, batch_size=3, epoch=2, seed=42)
    assert [len(batch) for batch in plan] == [3, 3, 3, 1]
    assert sorted(i for batch in plan for i in batch) == list(range(10))
    assert [len(b) for b in epoch_batches(lengths, batch_size=3, epoch=1, seed=42, drop_last=True)] == [
        3,
        3,
        3,
    ]
    assert epoch_batches(lengths, batch_size=4, epoch=0, seed=0, shuffle=False) == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]


def test_token_budget_fills_batches_up_to_the_budget() -> None:
    lengths = [3, 9, 4, 30, 2, 6, 5, 1]
    plan = epoch_batches(lengths, batch_size=1, epoch=0, seed=0, token_budget=10)
    assert plan == epoch_batches(lengths, batch_size=1, epoch=0, seed=0, token_budget=10)
    assert sorted(i for batch in plan for i in batch) == list(range(8))
    for batch in plan:
        assert sum(lengths[i] for i in batch) <= 10 or batch == [3]  # only the oversize example exceeds it
    ordered = epoch_batches(lengths, batch_size=1, epoch=0, seed=0, shuffle=False, token_budget=10)
    assert ordered == [[0], [1], [2], [3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="drop_last applies to fixed-size batches"):
        epoch_batches(lengths, batch_size=1, epoch=0, seed=0, token_budget=10, drop_last=True)


EXAMPLES = [
    {"input_ids": [11, 12, 13], "labels": [-100, 12, 13]},
    {"input_ids": [21, 22, 23, 24, 25], "labels": [-100, -100, -100, 24, 25]},
    {"input_ids": [31, 32], "labels": [31, 32]},
]


def test_padded_collator_pads_right_and_ignores_padding() -> None:
    batch = PaddedCollator(pad_token_id=0, pad_to_multiple_of=4)(EXAMPLES)
    assert batch["input_ids"].tolist() == [
        [11, 12, 13, 0, 0, 0, 0, 0],
        [21, 22, 23, 24, 25, 0, 0, 0],
        [31, 32, 0, 0, 0, 0, 0, 0],
    ]
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 5, 2]
    assert batch["labels"][0].tolist() == [-100, 12, 13, -100, -100, -100, -100, -100]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_packed_collator_is_one_row_with_restarting_positions() -> None:
    batch = PackedCollator()(EXAMPLES)
    assert set(batch) == {"input_ids", "position_ids", "labels", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                          "max_length_k"}
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 23, 24, 25, 31, 32]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, -100, -100, 24, 25, -100, 32]]


def test_packed_collator_gives_the_examples_offsets_computed_on_the_host() -> None:
    """The varlen attention kernel's inputs: cumulative starts (int32, on the CPU) and the longest example as an
    int, so the forward pass never reads them back from the GPU."""
    batch = PackedCollator()(EXAMPLES)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[key].dtype == torch.int32 and batch[key].device.type == "cpu"
        assert batch[key].tolist() == [0, 3, 8, 10]
    assert batch["max_length_q"] == batch["max_length_k"] == 5
    assert isinstance(batch["max_length_q"], int)


def trained_pairs_padded(batch: dict[str, torch.Tensor]) -> Counter[tuple[tuple[int, ...], int]]:
    """(context, target) for every trained position of a padded batch (HF shifts labels by one)."""
    pairs: Counter[tuple[tuple[int, ...], int]] = Counter()
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        pairs.update((tuple(ids[:t]), labels[t]) for t in range(1, len(ids)) if labels[t] != -100)
    return pairs


def trained_pairs_packed(batch: dict[str, torch.Tensor]) -> Counter[tuple[tuple[int, ...], int]]:
    """(context within the own example, target) for every trained position of a packed row."""
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    pairs: Counter[tuple[tuple[int, ...], int]] = Counter()
    positions = batch["position_ids"][0].tolist()
    starts = [t for t, position in enumerate(positions) if position == 0]
    start = 0
    for length in [end - begin for begin, end in zip(starts, [*starts[1:], len(positions)], strict=True)]:
        for t in range(start + 1, start + length):
            if labels[t] != -100:
                pairs[(tuple(ids[start:t]), labels[t])] += 1
        if labels[start] != -100:  # a label on a first token would be predicted from the previous example
            pairs[(("across a boundary",), labels[start])] += 1
        start += length
    return pairs


def test_packed_and_padded_batches_train_the_same_predictions() -> None:
    data = tokenize_dataset(
        [CHAT, CHAT | {"messages": CHAT["messages"][1:3]}], TOKENIZER, dataset_format="chat"
    )
    examples = [data[0], data[1], {"input_ids": [7, 8, 9], "labels": [7, 8, 9]}]
    padded = trained_pairs_padded(PaddedCollator(pad_token_id=TOKENIZER.pad_token_id)(examples))
    assert sum(padded.values()) > 10
    assert trained_pairs_packed(PackedCollator()(examples)) == padded


def test_padded_collator_keeps_an_examples_own_attention_mask():
    batch = PaddedCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 0]}, {"input_ids": [8]}])
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, -100], [8, -100, -100]]  # masked positions are never labels


# ---------------------------------------------------------------------------------------------- several sources


def _mixed_config(tmp_path: Path, **overrides: Any) -> SFTConfig:
    """Two sources: alpaca rows under other column names (4 rows) and chat rows (10 rows)."""
    alpaca = tmp_path / "qa.jsonl"
    alpaca.write_text("".join(json.dumps({"question": f"Count to {i}.", "answer": f"{i}."}) + "\n"
                              for i in range(4)), encoding="utf-8")
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Hello {i}"},
                                                     {"role": "assistant", "content": "Hello there."}]}) + "\n"
                            for i in range(10)), encoding="utf-8")
    settings: dict[str, Any] = {
        "base_model": "m",
        "datasets": [
            {"path": str(alpaca), "format": "alpaca", "columns": {"instruction": "question", "output": "answer"},
             "weight": 2},
            {"path": str(chat), "format": "chat", "weight": 0.5},
        ],
        "validation_split": 0.0,
        "max_seq_length": 64,
    }
    settings.update(overrides)
    return SFTConfig(**settings)


def test_datasets_sources_are_renamed_and_mixed_by_weight_deterministically(tmp_path: Path) -> None:
    tokenizer = bpe_tokenizer()
    config = _mixed_config(tmp_path)
    train, val = build_datasets(config, tokenizer)
    assert val is None and len(train) == 2 * 4 + 5  # every qa row twice, half of the chat rows
    texts = [tokenizer.decode(ids) for ids in train.input_ids]
    assert sum("### Response" in text for text in texts) == 8 and "Count to 3." in texts[3]
    assert sum("<|im_start|>assistant" in text for text in texts) == 5
    again, _ = build_datasets(config.model_copy(update={"cache_tokenized": False}), tokenizer)
    assert again.input_ids == train.input_ids and again.labels == train.labels  # same seed, same mix
    other, _ = build_datasets(config.model_copy(update={"seed": 7}), tokenizer)
    assert other.input_ids[8:] != train.input_ids[8:]  # another seed picks another half

    train, val = build_datasets(config.model_copy(update={"validation_split": 0.25}), tokenizer)
    assert len(val) == 1 + 2  # a quarter of each source, held out before weighting
    assert not {tuple(ids) for ids in val.input_ids} & {tuple(ids) for ids in train.input_ids}


def test_datasets_entry_with_a_missing_column_names_its_index_and_the_columns_it_has(tmp_path: Path) -> None:
    config = _mixed_config(tmp_path)
    entries = [entry.model_dump() for entry in config.datasets]
    entries[1]["columns"] = {"messages": "turns"}
    with pytest.raises(DataError) as error:
        build_datasets(config.model_copy(update={"datasets": [DatasetSource(**e) for e in entries]}),
                       bpe_tokenizer())
    assert "datasets[1]" in str(error.value) and "'turns'" in str(error.value)
    assert "its columns are: messages" in str(error.value)
    entries[1]["columns"] = {}
    entries[0]["columns"] = {"instruction": "question"}  # output stays unmapped: 'answer' is not 'output'
    with pytest.raises(DataError, match=r"datasets\[0\] .*no column 'output'.*its columns are: question, answer"):
        build_datasets(config.model_copy(update={"datasets": [DatasetSource(**e) for e in entries]}),
                       bpe_tokenizer())


# ---------------------------------------------------------------------------------------------- tokenized cache


def _alpaca_config(tmp_path: Path, rows: int = 6, **overrides: Any) -> SFTConfig:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Count to {i}.", "output": f"{i}."}) + "\n"
                            for i in range(rows)), encoding="utf-8")
    return SFTConfig(base_model="m", dataset_name=str(path), validation_split=0.0, max_seq_length=128, **overrides)


def _entries(directory: Path) -> list[Path]:
    return sorted(path for path in directory.glob("*") if path.is_dir()) if directory.is_dir() else []


def test_tokenized_data_is_cached_and_reused_only_for_the_same_key(
    tmp_path: Path, _tokenized_cache_in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.sft.data.tokenizing as data_module  # tokenized_source calls prepare_dataset there

    cache = _tokenized_cache_in_tmp
    before = set(_entries(cache))
    tokenizer = bpe_tokenizer()
    config = _alpaca_config(tmp_path)
    first, _ = build_datasets(config, tokenizer)
    (entry,) = set(_entries(cache)) - before

    calls = []
    real = data_module.prepare_dataset
    monkeypatch.setattr(data_module, "prepare_dataset", lambda *a, **k: calls.append(1) or real(*a, **k))
    second, _ = build_datasets(config, tokenizer)
    assert calls == [] and vars(second) == vars(first)  # from the cache, every attribute the same

    changes = [
        config.model_copy(update={"max_seq_length": 100}),
        config.model_copy(update={"train_on_inputs": True}),
        config.model_copy(update={"template_name": "chatml"}),
    ]
    for changed in changes:
        build_datasets(changed, tokenizer)
    build_datasets(config, bpe_tokenizer(add_bos=True))  # another tokenizer
    assert len(calls) == 4
    Path(config.dataset_name).write_text(json.dumps({"instruction": "Hi.", "output": "Hello."}) + "\n",
                                         encoding="utf-8")  # the data changed
    changed_data, _ = build_datasets(config, tokenizer)
    assert len(calls) == 5 and len(changed_data) == 1
    assert entry.is_dir() and len(set(_entries(cache)) - before) == 6

    build_datasets(config.model_copy(update={"cache_tokenized": False}), tokenizer)
    assert len(calls) == 6 and len(set(_entries(cache)) - before) == 6  # --no-cache neither reads nor writes


def test_a_corrupt_or_foreign_cache_entry_is_rebuilt_with_a_warning(
    tmp_path: Path, _tokenized_cache_in_tmp: Path
) -> None:
    from app.sft.token_cache import CacheWarning

    cache = _tokenized_cache_in_tmp
    tokenizer = bpe_tokenizer()
    config = _alpaca_config(tmp_path, rows=5)
    before = set(_entries(cache))
    expected, _ = build_datasets(config, tokenizer)
    (entry,) = set(_entries(cache)) - before
    (entry / "arrays.npz").write_bytes(b"not a numpy archive")
    with pytest.warns(CacheWarning, match="unreadable"):
        rebuilt, _ = build_datasets(config, tokenizer)
    assert vars(rebuilt) == vars(expected)
    assert vars(build_datasets(config, tokenizer)[0]) == vars(expected)  # the rebuilt entry is good again

    (tmp_path / "other").mkdir()
    other = _alpaca_config(tmp_path / "other", rows=3)  # an entry of another key, put under this key's name
    build_datasets(other, tokenizer)
    (other_entry,) = set(_entries(cache)) - before - {entry}
    (entry / "meta.json").write_text((other_entry / "meta.json").read_text())
    (entry / "arrays.npz").write_bytes((other_entry / "arrays.npz").read_bytes())
    with pytest.warns(CacheWarning, match="different key"):
        assert vars(build_datasets(config, tokenizer)[0]) == vars(expected)
