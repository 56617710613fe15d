"""SFTConfig: validation messages, YAML round trip, --set overrides, diff and hardware fallbacks."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from app.sft.config import ConfigError, SFTConfig
from app.sft.errors import ConfigWarning
from app.sft.hardware import resolve_for_hardware


def problems_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return excinfo.value.problems


def test_defaults_match_what_hf_and_trl_users_expect() -> None:
    config = SFTConfig(base_model="tiny")
    assert (config.use_lora, config.lora_r, config.lora_alpha, config.learning_rate) == (True, 8, 16, 2e-4)
    assert (config.dataset_format, config.validation_split, config.train_on_inputs) == ("alpaca", 0.1, False)
    assert config.report_to == [] and config.mixed_precision == "auto" and config.distributed.strategy == "auto"
    assert config.resolved_checkpoint_dir == str(Path("outputs/sft") / "checkpoints")
    assert SFTConfig(base_model="tiny", checkpoint_dir="/ckpt").resolved_checkpoint_dir == "/ckpt"


def test_every_problem_is_reported_at_once_with_its_field() -> None:
    with pytest.raises(ConfigError) as excinfo:
        SFTConfig.from_dict(
            {"lora_r": 0, "learning_rate": -1, "optimizer_type": "adam", "distributed": {"strategy": "zero"}},
            source="run.yaml",
        )
    message = str(excinfo.value)
    assert message.startswith("Invalid SFT config in run.yaml (5 problems):")
    assert sorted(line.split(":")[0] for line in problems_of(excinfo)) == [
        "base_model",
        "distributed.strategy",
        "learning_rate",
        "lora_r",
        "optimizer_type",
    ]
    assert "base_model: required setting is missing" in message
    assert "lora_r: Input should be greater than or equal to 1 (got 0)" in message


def test_unknown_keys_get_a_did_you_mean_also_in_nested_sections() -> None:
    with pytest.raises(ConfigError) as excinfo:
        SFTConfig.from_dict({"base_model": "m", "learning_rte": 1e-4, "distributed": {"stratgy": "ddp"}})
    assert set(problems_of(excinfo)) == {
        "learning_rte: unknown setting; did you mean 'learning_rate'?",
        "distributed.stratgy: unknown setting; did you mean 'strategy'?",
    }
    with pytest.raises(ConfigError, match=r"zzz: unknown setting$"):
        SFTConfig(base_model="m", zzz=1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lora_r", 0),
        ("lora_alpha", 0),
        ("lora_dropout", 1.0),
        ("batch_size", 0),
        ("eval_batch_size", 0),
        ("gradient_accumulation_steps", 0),
        ("learning_rate", 0.0),
        ("num_epochs", 0),
        ("max_steps", 0),
        ("warmup_ratio", 1.5),
        ("weight_decay", -0.1),
        ("max_grad_norm", 0.0),
        ("max_seq_length", 8),
        ("validation_split", 1.0),
        ("logging_steps", 0),
        ("save_steps", 0),
        ("eval_steps", 0),
        ("save_total_limit", 0),
        ("early_stopping_patience", 0),
        ("early_stopping_min_delta", -1.0),
        ("dataloader_num_workers", -1),
        ("seed", -1),
        ("dataset_format", "sharegpt"),
        ("scheduler_type", "step"),
        ("mixed_precision", "fp8"),
        ("dtype", "int8"),
        ("report_to", ["comet"]),
        ("use_lora", "maybe"),
    ],
)
def test_out_of_range_or_wrong_values_name_their_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as excinfo:
        SFTConfig(base_model="m", **{field: value})
    (problem,) = problems_of(excinfo)
    assert problem.split(":")[0].split(".")[0] == field
    assert repr(value if not isinstance(value, list) else value[0]) in problem


def test_assignment_is_validated_too() -> None:
    config = SFTConfig(base_model="m")
    with pytest.raises(ConfigError, match="batch_size"):
        config.batch_size = 0
    assert config.batch_size == 4


def test_contradictory_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="use_qlora .* needs use_lora: true"):
        SFTConfig(base_model="m", use_lora=False, use_qlora=True)
    with pytest.raises(
        ConfigError, match="template_name 'chatml' is not used with dataset_format 'completion'"
    ):
        SFTConfig(base_model="m", dataset_format="completion", template_name="chatml")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("none", []),
        (None, []),
        ("all", ["wandb", "tensorboard", "mlflow"]),
        (["mlflow", "none"], ["mlflow"]),
        ("wandb", ["wandb"]),
        (["tensorboard"], ["tensorboard"]),
    ],
)
def test_report_to_accepts_the_hf_spellings(value: object, expected: list[str]) -> None:
    assert SFTConfig(base_model="m", report_to=value).report_to == expected


def test_mixed_precision_no_means_fp32() -> None:
    assert SFTConfig(base_model="m", mixed_precision="no").mixed_precision is None


def test_yaml_round_trip_is_exact(tmp_path: Path) -> None:
    config = SFTConfig(
        base_model="org/model",
        dataset_name="data/train.jsonl",
        learning_rate=1e-5,
        lora_target_modules=["q_proj", "v_proj"],
        report_to="all",
        mixed_precision="bf16",
        max_steps=7,
        distributed={"strategy": "fsdp", "fsdp_version": 1},
    )
    path = config.to_yaml(tmp_path / "nested" / "run.yaml")
    assert SFTConfig.from_yaml(path) == config
    assert yaml.safe_load(path.read_text())["distributed"] == {
        "strategy": "fsdp",
        "fsdp_version": 1,
        "fsdp_auto_wrap": True,
    }


def test_hand_written_yaml_with_yaml_1_1_exponent_floats_loads(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("base_model: m\nlearning_rate: 2e-4\nreport_to: none\n")  # 2e-4 is a *string* in YAML 1.1
    config = SFTConfig.from_yaml(path)
    assert config.learning_rate == pytest.approx(2e-4) and config.report_to == []


def test_yaml_problems_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"Config file not found: .*missing\.yaml"):
        SFTConfig.from_yaml(tmp_path / "missing.yaml")

    broken = tmp_path / "broken.yaml"
    broken.write_text("base_model: m\nlora_r: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: invalid YAML at line 3"):
        SFTConfig.from_yaml(broken)

    listed = tmp_path / "list.yaml"
    listed.write_text("- base_model: m\n")
    with pytest.raises(
        ConfigError, match=r"list\.yaml: expected a mapping of settings at the top level, got list"
    ):
        SFTConfig.from_yaml(listed)

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=r"empty\.yaml: the file is empty"):
        SFTConfig.from_yaml(empty)

    typo = tmp_path / "typo.yaml"
    typo.write_text("base_model: m\nbatch_sise: 8\n")
    with pytest.raises(ConfigError, match=r"(?s)in .*typo\.yaml \(1 problem\):.*batch_sise: .*'batch_size'"):
        SFTConfig.from_yaml(typo)


def test_overrides_parse_values_as_yaml_and_leave_the_original_alone() -> None:
    config = SFTConfig(base_model="m", wandb_project="p")
    changed = config.with_overrides(
        [
            "max_steps=3",
            "learning_rate=1e-4",
            "use_lora=false",
            "wandb_project=null",
            "lora_target_modules=[q_proj, v_proj]",
            "distributed.strategy=ddp",
            "run_name=a=b",
        ]
    )
    assert (changed.max_steps, changed.learning_rate, changed.use_lora) == (3, 1e-4, False)
    assert changed.wandb_project is None and changed.lora_target_modules == ["q_proj", "v_proj"]
    assert changed.distributed.strategy == "ddp" and changed.run_name == "a=b"
    assert config.max_steps is None and config.distributed.strategy == "auto"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("max_steps", r"--set 'max_steps': expected key=value"),
        ("=3", r"--set '=3': expected key=value"),
        ("lora_r.x=2", r"--set 'lora_r.x=2': 'lora_r' is a value, not a section"),
        ("lora_r=[1", r"--set 'lora_r=\[1': invalid YAML"),
        ("lora_rr=2", r"(?s)in --set overrides .*lora_rr: unknown setting; did you mean 'lora_r'\?"),
        ("batch_size=0", r"(?s)in --set overrides .*batch_size: .*greater than or equal to 1"),
    ],
)
def test_malformed_or_invalid_overrides_are_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SFTConfig(base_model="m").with_overrides([override])


def test_diff_lists_changed_settings_with_dotted_nested_keys() -> None:
    old = SFTConfig(base_model="m")
    new = old.with_overrides(["lora_r=16", "distributed.fsdp_version=1"])
    assert old.diff(new) == {"lora_r": (8, 16), "distributed.fsdp_version": (2, 1)}
    assert old.diff(old.model_copy()) == {}


def resolve(config: SFTConfig, **machine: bool) -> tuple[SFTConfig, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolved = resolve_for_hardware(config, **machine)
    assert all(issubclass(w.category, ConfigWarning) for w in caught)
    return resolved, [str(w.message) for w in caught]


def test_bf16_without_support_falls_back_to_fp32_with_one_warning() -> None:
    config = SFTConfig(base_model="m", mixed_precision="bf16")
    resolved, messages = resolve(config, cuda=False, bf16_supported=False)
    assert resolved.mixed_precision is None and config.mixed_precision == "bf16"
    assert messages == ["mixed_precision 'bf16' is not supported on this machine; training in fp32 instead"]
    assert resolve(config, cuda=True, bf16_supported=True) == (config, [])


def test_fp16_needs_cuda() -> None:
    config = SFTConfig(base_model="m", mixed_precision="fp16")
    resolved, messages = resolve(config, cuda=False)
    assert resolved.mixed_precision is None and messages == [
        "mixed_precision 'fp16' needs a CUDA GPU; training in fp32 instead"
    ]
    assert resolve(config, cuda=True) == (config, [])


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_optimizers_fall_back_to_adamw(optimizer: str) -> None:
    config = SFTConfig(base_model="m", optimizer_type=optimizer, mixed_precision=None)
    resolved, messages = resolve(config, cuda=True, bitsandbytes=False)
    assert resolved.optimizer_type == "adamw"
    assert messages == [f"optimizer_type {optimizer!r} needs bitsandbytes and a CUDA GPU; using 'adamw'"]
    assert resolve(config, cuda=True, bitsandbytes=True) == (config, [])


def test_fused_adamw_needs_cuda_and_each_fallback_warns_once() -> None:
    config = SFTConfig(base_model="m", optimizer_type="adamw_fused", mixed_precision="bf16")
    resolved, messages = resolve(config, cuda=False, bf16_supported=False)
    assert (resolved.optimizer_type, resolved.mixed_precision) == ("adamw", None)
    assert len(messages) == 2 and "adamw_fused" in messages[1]


@pytest.mark.parametrize("field", ["torch_compile", "use_liger_kernel"])
def test_gpu_speed_options_are_off_on_a_cpu_and_kept_on_cuda(field: str) -> None:
    config = SFTConfig(base_model="m", mixed_precision=None, **{field: True})
    resolved, messages = resolve(config, cuda=False)
    assert getattr(resolved, field) is False
    assert len(messages) == 1 and field in messages[0]
    assert resolve(config, cuda=True) == (config, [])


def test_hub_kernels_and_gpu_levers_are_off_by_default() -> None:
    config = SFTConfig(base_model="m")
    assert (config.use_kernels, config.torch_compile, config.use_liger_kernel) == (False, False, False)


@pytest.mark.parametrize(
    ("machine", "missing"),
    [
        ({"cuda": False, "bitsandbytes": True}, "a CUDA GPU"),
        ({"cuda": True, "bitsandbytes": False}, "the bitsandbytes package"),
        ({"cuda": False, "bitsandbytes": False}, "a CUDA GPU and the bitsandbytes package"),
    ],
)
def test_qlora_cannot_be_emulated(machine: dict[str, bool], missing: str) -> None:
    config = SFTConfig(base_model="m", use_qlora=True, mixed_precision=None)
    with pytest.raises(ConfigError, match=f"use_qlora: QLoRA needs {missing} "):
        resolve_for_hardware(config, **machine)
    assert resolve(config, cuda=True, bitsandbytes=True) == (config, [])


def test_resolve_detects_the_machine_when_not_told() -> None:
    import torch

    config = SFTConfig(base_model="m", mixed_precision="fp16")
    expected = "fp16" if torch.cuda.is_available() else None
    assert resolve(config)[0].mixed_precision == expected


# ---------------------------------------------------------------------------------------------- other tools' names


def test_trl_and_axolotl_names_are_read_as_our_fields() -> None:
    config = SFTConfig(
        base_model="m",
        per_device_train_batch_size=8,
        num_train_epochs=3,
        lr_scheduler_type="linear",
        bf16=True,
        sequence_len=256,
        val_set_size=0.05,
        chat_template="tokenizer_default",
        gradient_accumulation_steps=2,
    )
    assert (config.batch_size, config.num_epochs, config.scheduler_type, config.mixed_precision) == (
        8, 3, "linear", "bf16")
    assert (config.max_seq_length, config.validation_split, config.template_name) == (256, 0.05, "tokenizer")
    assert SFTConfig(base_model="m", micro_batch_size=2, fp16=True, max_length=99).model_dump()["batch_size"] == 2
    assert SFTConfig(base_model="m", fp16=True).mixed_precision == "fp16"
    assert SFTConfig(base_model="m", bf16=False).mixed_precision == "auto"  # false sets nothing: the default stays
    assert SFTConfig(base_model="m", max_seq_len=77).max_seq_length == 77
    assert "per_device_train_batch_size" not in SFTConfig(base_model="m", per_device_train_batch_size=8).to_dict()
    assert SFTConfig(base_model="m").with_overrides(["bf16=true"]).mixed_precision == "bf16"


def test_an_alias_given_with_its_field_is_an_error_naming_both(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        SFTConfig(base_model="m", per_device_train_batch_size=8, batch_size=4)
    (problem,) = problems_of(excinfo)
    assert "per_device_train_batch_size" in problem and "batch_size are both set" in problem
    path = tmp_path / "c.yaml"
    path.write_text("base_model: m\nbf16: true\nfp16: true\n")
    with pytest.raises(ConfigError, match="fp16 and bf16 are both set"):
        SFTConfig.from_yaml(path)


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("per_device_batch_size", "batch_size"),
        ("train_batch_size", "batch_size"),
        ("sequence_length", "max_seq_length"),
        ("num_train_epoch", "num_epochs"),
        ("lora_rank", "lora_r"),
        ("learning_rat", "learning_rate"),
    ],
)
def test_did_you_mean_suggests_the_field_that_means_the_same(key: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        SFTConfig(base_model="m", **{key: 1})
    assert problems_of(excinfo) == [f"{key}: unknown setting; did you mean {suggestion!r}?"]


def test_datasets_entries_are_validated_with_their_index() -> None:
    with pytest.raises(ConfigError) as excinfo:
        SFTConfig(base_model="m", datasets=[{"path": "a.jsonl"}, {"path": "b.jsonl", "weight": 0}, {"pth": "c"}])
    problems = problems_of(excinfo)
    assert any(p.startswith("datasets[1].weight:") for p in problems)
    assert "datasets[2].path: required setting is missing" in problems
    assert "datasets[2].pth: unknown setting; did you mean 'path'?" in problems
    with pytest.raises(ConfigError, match=r"datasets\[0\].columns: 'prompt' is not a field of alpaca rows"):
        SFTConfig(base_model="m", datasets=[{"path": "a.jsonl", "columns": {"prompt": "q"}}])
    with pytest.raises(ConfigError, match="dataset_name and datasets are both set"):
        SFTConfig(base_model="m", dataset_name="x.jsonl", datasets=[{"path": "a.jsonl"}])


def test_describe_fields_gives_every_setting_its_default_and_help() -> None:
    from app.sft.config import describe_fields

    rows = {name: (default, help_) for name, default, help_ in describe_fields()}
    assert set(rows) >= set(SFTConfig.model_fields) - {"distributed"} | {"distributed.strategy"}
    assert all(help_ for _, help_ in rows.values()), [name for name, (_, h) in rows.items() if not h]
    assert rows["batch_size"][0] == "4" and rows["base_model"][0] == "(required)"
    assert rows["lora_r"][1] == SFTConfig.model_fields["lora_r"].description


def test_a_yaml_alias_bomb_is_refused_at_once_naming_the_file(tmp_path: Path) -> None:
    """Nested aliases that would expand to billions of values are refused before anything expands them."""
    lines = ["base_model: tiny", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    lines.append("run_name: *a9")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n", encoding="utf-8")
    import time

    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb\.yaml.*alias"):
        SFTConfig.from_yaml(bomb)
    assert time.perf_counter() - started < 2


def test_a_few_plain_aliases_still_work(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text("base_model: tiny\nlora_target_modules: &mods [q_proj, v_proj]\nrun_name: &n demo\n"
                    "wandb_run_name: *n\n", encoding="utf-8")
    config = SFTConfig.from_yaml(path)
    assert config.wandb_run_name == "demo" and config.lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_an_infinite_or_nan_number_is_refused_by_field(tmp_path: Path, value: str) -> None:
    path = tmp_path / "inf.yaml"
    path.write_text(f"base_model: tiny\nlearning_rate: {value}\nweight_decay: {value}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as excinfo:
        SFTConfig.from_yaml(path)
    fields = sorted(line.split(":")[0] for line in problems_of(excinfo))
    assert fields == ["learning_rate", "weight_decay"]
