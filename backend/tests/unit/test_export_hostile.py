"""Hostile inputs to what users do with a trained run: `sft export`, `sft merge`, `sft generate`.

Runs are the tiny random LoRA runs of test_export.py (`make_run`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_export import batch_logits, make_run, merged_model, relative_error
from transformers import AutoModelForCausalLM

from app.sft.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("hostile"), "llama", tie=True)


@pytest.fixture(scope="module")
def diverged(run, tmp_path_factory) -> Path:
    """A copy of `run` whose adapter weights are NaN, as a run whose training diverged saves them."""
    copy = tmp_path_factory.mktemp("diverged") / "run"
    shutil.copytree(run, copy)
    weights = load_file(copy / "adapter_model.safetensors")
    save_file({name: torch.full_like(value, float("nan")) if "lora_B" in name else value
               for name, value in weights.items()}, copy / "adapter_model.safetensors")
    return copy


@pytest.mark.parametrize("command", [
    ["generate", "{run}", "--prompt", "hello", "--max-new-tokens", "2"],
    ["export", "{run}", "--out", "{tmp}/model.gguf"],
    ["merge", "{run}", "--out", "{tmp}/merged"],
])
def test_diverged_run_is_refused_in_one_line_naming_the_weight_and_nothing_is_written(
    diverged, command, tmp_path, capsys
):
    args = [part.format(run=diverged, tmp=tmp_path) for part in command]
    assert main(args) == 2
    messages = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sft ")]
    assert len(messages) == 1, messages
    assert "NaN or infinite" in messages[0] and "lora_B" in messages[0] and str(diverged) in messages[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("temperature", ["nan", "inf", "-1"])
def test_generate_with_a_temperature_that_is_not_a_finite_number_is_refused_naming_it(run, temperature, capsys):
    assert main(["generate", str(run), "--prompt", "hello", "--max-new-tokens", "2", "--temperature", temperature]) != 0
    messages = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sft ")]
    assert len(messages) == 1 and "temperature" in messages[0] and temperature in messages[0], messages


@pytest.mark.parametrize("command", ["generate", "export"])
def test_model_folder_without_a_tokenizer_is_named_in_one_line(run, command, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(run.parent / "base", folder, ignore=shutil.ignore_patterns("tokenizer*", "*.jinja"))
    args = {"generate": ["--prompt", "hi", "--max-new-tokens", "2"], "export": ["--dtype", "f32"]}[command]
    assert main([command, str(folder), *args]) == 2
    messages = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sft ")]
    assert len(messages) == 1 and str(folder) in messages[0] and "no tokenizer" in messages[0], messages
    assert sorted(path.name for path in folder.iterdir()) == ["config.json", "generation_config.json",
                                                              "model.safetensors"]


@pytest.mark.parametrize("damage", ["no adapter weights", "adapter_config.json not JSON"])
@pytest.mark.parametrize("command", ["export", "merge", "generate"])
def test_half_copied_adapter_is_named_in_one_line(run, damage, command, tmp_path, capsys):
    damaged = tmp_path / "run"
    shutil.copytree(run, damaged)
    if damage == "no adapter weights":
        (damaged / "adapter_model.safetensors").unlink()
    else:
        (damaged / "adapter_config.json").write_text("{", encoding="utf-8")
    args = {"export": ["--out", str(tmp_path / "model.gguf")], "merge": ["--out", str(tmp_path / "merged")],
            "generate": ["--prompt", "hi", "--max-new-tokens", "2"]}[command]
    assert main([command, str(damaged), *args]) == 2
    messages = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sft ")]
    expected = "adapter_model.safetensors" if damage == "no adapter weights" else "adapter_config.json is not valid"
    assert len(messages) == 1 and str(damaged) in messages[0] and expected in messages[0], messages
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]


def test_adapter_saved_by_peft_alone_merges_and_generates_like_the_run(run, tmp_path, capsys):
    """A LoRA adapter folder without the run's config.yaml (what TRL or peft's save_pretrained write)."""
    adapter = tmp_path / "adapter"
    shutil.copytree(run, adapter, ignore=shutil.ignore_patterns("config.yaml"))
    prompt = ["--prompt", "hello world", "--max-new-tokens", "4"]
    assert main(["generate", str(run), *prompt]) == 0
    expected = capsys.readouterr().out
    assert main(["generate", str(adapter), *prompt]) == 0
    assert capsys.readouterr().out == expected
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged, generator = merged_model(run)
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert relative_error(batch_logits(merged, generator.tokenizer), batch_logits(written, generator.tokenizer)) < 1e-5


def test_a_prompt_of_no_tokens_is_refused_in_words(run):
    """A completion run given "" (its tokenizer adds no BOS) has nothing to continue."""
    _, generator = merged_model(run)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generator.answer([], max_new_tokens=2)
