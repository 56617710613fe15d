"""Hostile inputs from users of TRL, Axolotl and Hugging Face datasets: files and configs as other tools and
editors write them, each either read as meant or refused in one message naming the file, line or field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _data_helpers import bpe_tokenizer

from app.sft.config import ConfigError, SFTConfig
from app.sft.data import DataError, DataWarning, build_datasets, load_rows

ROW = {"instruction": "What is the capital of France?", "input": "", "output": "Paris."}

# ------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", ["data.jsonl", "data.json", "array.json", "data.csv"])
def test_a_file_starting_with_a_utf8_byte_order_mark_loads_its_rows(tmp_path: Path, name: str) -> None:
    texts = {
        "data.jsonl": json.dumps(ROW) + "\r\n",
        "data.json": json.dumps(ROW) + "\n",
        "array.json": json.dumps([ROW], indent=2),
        "data.csv": "instruction,input,output\r\nWhat is the capital of France?,,Paris.\r\n",
    }
    path = tmp_path / name
    path.write_bytes(texts[name].encode("utf-8-sig"))  # as Notepad and Excel save "UTF-8"
    rows = load_rows(str(path))
    assert rows.column_names == ["instruction", "input", "output"]
    assert rows[0]["instruction"] == ROW["instruction"] and rows[0]["output"] == ROW["output"]


def test_a_csv_header_naming_a_column_twice_is_refused_not_read_as_its_last_copy(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("instruction,instruction,output\nWhat is the capital?,Of France,Paris.\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:1: .*'instruction' more than once"):
        load_rows(str(path))


def test_one_json_object_over_several_lines_is_named_as_such_not_as_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "data.json"  # the layout datasets.load_dataset("json", field="data") reads
    path.write_text(json.dumps({"version": 1, "data": [ROW, ROW]}, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=r"data.json: one JSON object over several lines.*'data' holds a list"):
        load_rows(str(path))
    path.write_text(json.dumps(ROW, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=r"data.json: one JSON object over several lines, not records"):
        load_rows(str(path))


def test_records_that_are_all_empty_objects_are_not_called_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("{}\n{}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"data.jsonl: its 2 records are all empty objects"):
        load_rows(str(path))


# ------------------------------------------------------------------------------------------- config

def _config(tmp_path: Path, text: str) -> SFTConfig:
    path = tmp_path / "config.yaml"
    path.write_text("base_model: tiny\ndataset_name: data.jsonl\n" + text, encoding="utf-8")
    return SFTConfig.from_yaml(path)


@pytest.mark.parametrize("word", ["'false'", "'no'", "'False'", "0"])
def test_other_tools_boolean_aliases_written_as_strings_mean_what_they_say(tmp_path: Path, word: str) -> None:
    # completion_only_loss: "false" is TRL's train_on_inputs: true; it must not be read as the opposite
    assert _config(tmp_path, f"completion_only_loss: {word}\n").train_on_inputs is True
    assert _config(tmp_path, f"bf16: {word}\n").mixed_precision == SFTConfig(base_model="m").mixed_precision
    assert _config(tmp_path, f"lora_target_linear: {word}\n").lora_target_modules == (
        SFTConfig(base_model="m").lora_target_modules)


@pytest.mark.parametrize("word", ["'true'", "'yes'", "'True'", "1"])
def test_other_tools_boolean_aliases_written_as_true_strings_switch_them_on(tmp_path: Path, word: str) -> None:
    assert _config(tmp_path, f"completion_only_loss: {word}\n").train_on_inputs is False
    assert _config(tmp_path, f"bf16: {word}\n").mixed_precision == "bf16"
    assert _config(tmp_path, f"lora_target_linear: {word}\n").lora_target_modules == "all-linear"


def test_a_setting_given_twice_in_the_yaml_is_refused_naming_both_lines(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config.yaml: 'num_epochs' is set twice \(lines 3 and 5\)"):
        _config(tmp_path, "num_epochs: 1\nlearning_rate: 2e-4\nnum_epochs: 3\n")
    with pytest.raises(ConfigError, match=r"'weight' is set twice \(lines 5 and 6\)"):
        _config(tmp_path, "datasets:\n  - path: a.jsonl\n    weight: 1\n    weight: 2\n")


def test_entries_sharing_keys_anchors_and_merge_keys_are_not_repeats(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("base_model: tiny\ndatasets:\n  - &first {path: a.jsonl, weight: 1}\n"
                    "  - <<: *first\n    path: b.jsonl\n", encoding="utf-8")
    config = SFTConfig.from_yaml(path)
    assert [(entry.path, entry.weight) for entry in config.datasets] == [("a.jsonl", 1.0), ("b.jsonl", 1.0)]


# ------------------------------------------------------------------------------- validation data


def _count_rows(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"instruction": f"Count to {i}.", "output": f"{i}."}) + "\n"
                            for i in range(count)), encoding="utf-8")
    return path


def test_validation_never_holds_what_another_datasets_entry_trains_on(tmp_path: Path) -> None:
    numbers = _count_rows(tmp_path / "numbers.jsonl", 10)
    config = SFTConfig(base_model="m", datasets=[{"path": str(numbers)}, {"path": str(numbers), "weight": 0.5}],
                       validation_split=0.2, max_seq_length=64, cache_tokenized=False)
    with pytest.warns(DataWarning, match=r"datasets: \d+ validation examples are also training examples"):
        train, val = build_datasets(config, bpe_tokenizer())
    assert val is not None and len(val) > 0
    assert not {tuple(ids) for ids in val.input_ids} & {tuple(ids) for ids in train.input_ids}


def test_validation_left_empty_by_entries_repeating_each_other_is_an_error(tmp_path: Path) -> None:
    numbers = _count_rows(tmp_path / "numbers.jsonl", 2)  # seed 0 holds out row 0 of one entry, row 1 of the other
    config = SFTConfig(base_model="m", datasets=[{"path": str(numbers)}] * 2, validation_split=0.5, seed=0,
                       max_seq_length=64, cache_tokenized=False)
    with pytest.raises(DataError, match="every validation example is also a training example of another entry"):
        build_datasets(config, bpe_tokenizer())


def test_a_source_too_small_to_split_is_named(tmp_path: Path) -> None:
    numbers, single = _count_rows(tmp_path / "numbers.jsonl", 10), _count_rows(tmp_path / "single.jsonl", 1)
    config = SFTConfig(base_model="m", datasets=[{"path": str(numbers)}, {"path": str(single)}],
                       validation_split=0.2, max_seq_length=64, cache_tokenized=False)
    with pytest.raises(DataError, match=rf"datasets\[1\] \({single}\): validation_split=0.2 of 1 examples"):
        build_datasets(config, bpe_tokenizer())
    config = SFTConfig(base_model="m", dataset_name=str(single), validation_split=0.2, max_seq_length=64,
                       cache_tokenized=False)
    with pytest.raises(DataError, match=rf"{single}: validation_split=0.2 of 1 examples leaves nothing to train on"):
        build_datasets(config, bpe_tokenizer())
