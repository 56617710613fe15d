"""`mixed_precision: auto`: measured once per machine, cached, never a precision the machine cannot run."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from app.sft import SFTConfig, SFTTrainer
from app.sft.errors import ConfigWarning
from app.sft.hardware import resolve_for_hardware
from app.sft.precision import (
    CACHE_FILE,
    MIN_PRODUCT_FLOPS,
    PrecisionChoice,
    machine_key,
    measure_rates,
    model_products,
    processor_name,
    store_rates,
)

# Big enough that bf16 could pay (its products exceed MIN_PRODUCT_FLOPS), small enough to time in a blink.
SMALL_LM = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000)


@pytest.fixture(autouse=True)
def short_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Time the products for 50 ms instead of a second: the tests check what is measured, not how well."""
    monkeypatch.setattr("app.sft.precision.PROBE_SECONDS", 0.05)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The probe's cache file, in a cache folder of this test's own."""
    monkeypatch.setenv("LLM_PLAYGROUND_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / CACHE_FILE


def auto_config(**overrides) -> SFTConfig:
    return SFTConfig(base_model="m", batch_size=4, max_seq_length=256, **overrides)


def resolve(config: SFTConfig, **machine) -> SFTConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)  # auto chooses; it never falls back with a warning
        return resolve_for_hardware(config, **machine)


def write_rates(config: SFTConfig, model_config: LlamaConfig, rates: dict[str, float]) -> None:
    """Store `rates` as this machine's measurement for the products `config` trains `model_config` with."""
    from app.sft.precision import default_cache_path

    products = model_products(model_config, config.batch_size * config.max_seq_length)
    store_rates(default_cache_path(), machine_key(products), rates)


def test_products_are_the_models_own_shapes() -> None:
    products = model_products(LlamaConfig(**SMALL_LM), tokens=512)
    shapes = {(p.in_features, p.out_features): p.count for p in products}
    # q and o (256x256), k and v (256 -> 2 heads x 64), gate and up, down, the output layer
    assert shapes == {(256, 256): 2 * 2, (256, 128): 2 * 2, (256, 512): 2 * 2, (512, 256): 2, (256, 1000): 1}
    assert all(p.tokens == 512 for p in products)


def test_measure_rates_times_each_precision_and_keeps_the_random_state() -> None:
    state = torch.get_rng_state()
    rates = measure_rates(model_products(LlamaConfig(**SMALL_LM), tokens=64), ("fp32", "bf16"), seconds=0.05)
    assert set(rates) == {"fp32", "bf16"} and all(rate > 0 for rate in rates.values())
    assert torch.equal(torch.get_rng_state(), state)
    per_cpu_second = measure_rates(model_products(LlamaConfig(**SMALL_LM), tokens=64), ("fp32",), 0.05,
                                   clock=time.process_time)
    assert list(per_cpu_second) == ["fp32"] and per_cpu_second["fp32"] > 0


def test_auto_on_a_cpu_with_bf16_measures_once_then_reads_the_cache(cache: Path) -> None:
    first = resolve(auto_config(), cuda=False, bf16_supported=True, model_config=LlamaConfig(**SMALL_LM))
    choice = first.precision_choice
    assert choice.source == "measured" and set(choice.gflops) == {"fp32", "bf16"}
    faster = max(choice.gflops, key=choice.gflops.get)
    assert choice.name == faster and first.mixed_precision == (None if faster == "fp32" else "bf16")
    stored = json.loads(cache.read_text())["entries"]
    assert len(stored) == 1 and stored[0]["key"]["processor"] == processor_name()
    assert stored[0]["gflops"] == choice.gflops

    again = resolve(auto_config(), cuda=False, bf16_supported=True, model_config=LlamaConfig(**SMALL_LM))
    assert again.precision_choice.source == "cached" and again.precision_choice.gflops == choice.gflops
    assert again.mixed_precision == first.mixed_precision


@pytest.mark.parametrize(("rates", "expected"), [({"fp32": 235.0, "bf16": 135.0}, None),
                                                 ({"fp32": 120.0, "bf16": 420.0}, "bf16")])
def test_auto_takes_the_faster_precision(cache: Path, rates: dict[str, float], expected: str | None) -> None:
    config, model_config = auto_config(), LlamaConfig(**SMALL_LM)
    write_rates(config, model_config, rates)
    resolved = resolve(config, cuda=False, bf16_supported=True, model_config=model_config)
    assert resolved.mixed_precision == expected
    assert resolved.precision_choice.to_dict() == {
        "mixed_precision": expected or "fp32", "source": "cached", "gflops": rates,
        "reason": f"{expected or 'fp32'} multiplies the model's matrices faster on this machine",
    }
    assert resolved.precision_choice.describe() == (
        f"mixed_precision auto: {expected or 'fp32'} (measured earlier: fp32 {rates['fp32']:.0f} GFLOP/s, "
        f"bf16 {rates['bf16']:.0f} GFLOP/s)"
    )


@pytest.mark.parametrize(("machine", "expected"), [
    ({"cuda": False, "bf16_supported": False}, None),  # a CPU without native bf16
    ({"cuda": True, "bf16_supported": False}, None),  # a GPU without bf16
    ({"cuda": True, "bf16_supported": True}, "bf16"),  # a GPU with bf16: no probe
])
def test_auto_never_picks_a_precision_the_machine_cannot_run(cache: Path, machine, expected) -> None:
    config, model_config = auto_config(), LlamaConfig(**SMALL_LM)
    write_rates(config, model_config, {"fp32": 1.0, "bf16": 1000.0, "fp16": 1000.0})
    before = cache.read_text()
    resolved = resolve(config, model_config=model_config, **machine)
    assert resolved.mixed_precision == expected and resolved.precision_choice.source == "rule"
    assert cache.read_text() == before  # nothing measured


def test_auto_trains_tiny_models_in_fp32_without_measuring(cache: Path) -> None:
    tiny = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=100)
    assert max(p.flops for p in model_products(tiny, 1024)) < MIN_PRODUCT_FLOPS
    resolved = resolve(auto_config(), cuda=False, bf16_supported=True, model_config=tiny)
    assert resolved.mixed_precision is None and "too small" in resolved.precision_choice.reason
    assert not cache.exists()


def test_auto_without_the_models_shapes_is_fp32(cache: Path) -> None:
    resolved = resolve(auto_config(), cuda=False, bf16_supported=True)  # "m" is nowhere on this machine
    assert resolved.mixed_precision is None and "shapes" in resolved.precision_choice.reason


@pytest.mark.parametrize("content", [
    "{not json",
    "\x00\xff binary",
    json.dumps({"some": "other tool's file"}),
    json.dumps([1, 2, 3]),
    json.dumps({"format": "llm-playground mixed-precision probe, version 1",
                "entries": [{"key": {}, "gflops": {"fp32": "fast"}}]}),
])
def test_a_corrupt_or_foreign_cache_file_is_ignored_and_rewritten(cache: Path, content: str) -> None:
    cache.parent.mkdir(parents=True)
    cache.write_text(content, encoding="utf-8")
    resolved = resolve(auto_config(), cuda=False, bf16_supported=True, model_config=LlamaConfig(**SMALL_LM))
    assert resolved.precision_choice.source == "measured"
    entries = json.loads(cache.read_text())["entries"]
    assert [entry["gflops"] for entry in entries] == [resolved.precision_choice.gflops]


def test_another_machines_measurement_is_kept_but_not_used(cache: Path) -> None:
    config, model_config = auto_config(), LlamaConfig(**SMALL_LM)
    products = model_products(model_config, config.batch_size * config.max_seq_length)
    other = {**machine_key(products), "processor": "Some Other CPU"}
    store_rates(cache, other, {"fp32": 1.0, "bf16": 1000.0})
    resolved = resolve(config, cuda=False, bf16_supported=True, model_config=model_config)
    assert resolved.precision_choice.source == "measured"
    processors = [entry["key"]["processor"] for entry in json.loads(cache.read_text())["entries"]]
    assert processors == ["Some Other CPU", processor_name()]


def test_several_processes_never_measure_but_share_the_cached_choice(cache: Path, monkeypatch) -> None:
    config, model_config = auto_config(), LlamaConfig(**SMALL_LM)
    monkeypatch.setenv("WORLD_SIZE", "2")
    first = resolve(config, cuda=False, bf16_supported=True, model_config=model_config)
    assert first.mixed_precision is None and first.precision_choice.source == "rule" and not cache.exists()
    write_rates(config, model_config, {"fp32": 100.0, "bf16": 300.0})  # what a one-process run measured
    assert resolve(config, cuda=False, bf16_supported=True, model_config=model_config).mixed_precision == "bf16"


def test_an_unwritable_cache_only_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("LLM_PLAYGROUND_CACHE", str(blocker))
    resolved = resolve(auto_config(), cuda=False, bf16_supported=True, model_config=LlamaConfig(**SMALL_LM))
    assert resolved.precision_choice.source == "measured"
    assert "Could not cache the precision measurement" in caplog.text
    assert blocker.read_text() == "a file where the cache folder should be"


@pytest.mark.parametrize(("setting", "machine", "expected"), [
    ("bf16", {"cuda": False, "bf16_supported": True}, "bf16"),
    ("bf16", {"cuda": False, "bf16_supported": False}, None),  # the existing fallback, with its warning
    ("fp16", {"cuda": True}, "fp16"),
    ("fp16", {"cuda": False}, None),
    (None, {"cuda": True, "bf16_supported": True}, None),
])
def test_explicit_settings_are_honoured_as_before(cache: Path, setting, machine, expected) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        resolved = resolve_for_hardware(auto_config(mixed_precision=setting), **machine)
    assert resolved.mixed_precision == expected
    assert resolved.precision_choice.source == "config" and resolved.precision_choice.gflops == {}
    assert not cache.exists()


def test_a_saved_config_keeps_auto(cache: Path, tmp_path: Path) -> None:
    config = auto_config()
    resolved = resolve(config, cuda=False, bf16_supported=False)
    assert resolved.mixed_precision is None and resolved.to_dict() == config.to_dict()
    assert SFTConfig.from_yaml(resolved.to_yaml(tmp_path / "config.yaml")) == config
    assert resolve(auto_config(mixed_precision=None)).to_dict()["mixed_precision"] is None


def test_the_choice_is_in_the_training_summary_and_the_report(cache: Path, tmp_path: Path, tiny_llama,
                                                               tiny_tokenizer) -> None:
    config = SFTConfig(base_model="tiny", output_dir=str(tmp_path / "out"), max_steps=1, batch_size=2,
                       max_seq_length=32, validation_split=0.0, disable_progress_bar=True, use_lora=False)
    rows = [{"instruction": "say hello", "output": "hello world"}] * 4
    trainer = SFTTrainer(config, model=tiny_llama(), tokenizer=tiny_tokenizer, train_dataset=rows)
    trainer.train()
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    recorded = summary["mixed_precision"]
    assert recorded["mixed_precision"] == "fp32" and recorded["source"] == "rule"  # tiny model (or no bf16)
    assert PrecisionChoice.from_dict(recorded) == trainer.config.precision_choice
    report = (tmp_path / "out" / "report.html").read_text()
    assert "mixed_precision auto: fp32" in report
