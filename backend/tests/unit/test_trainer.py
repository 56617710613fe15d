"""SFTTrainer end to end on a tiny random Llama: parity with transformers.Trainer, learning, events, outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import build_tiny_tokenizer, tiny_llama
from torch.utils.data import Dataset, SequentialSampler
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from app.sft import SFTCallback, SFTConfig, SFTTrainer, ValidationCallback
from app.sft.data import PaddedCollator, epoch_batches

CAPITALS = {"france": "paris", "germany": "berlin", "italy": "rome", "spain": "madrid", "japan": "tokyo"}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def instruction_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """A small synthetic instruction task (capitals and sums) that a tiny model learns in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        if int(torch.randint(2, (1,), generator=g)) == 0:
            country = list(CAPITALS)[int(torch.randint(len(CAPITALS), (1,), generator=g))]
            rows.append({"instruction": "what is the capital of " + country, "output": CAPITALS[country]})
        else:
            a, b = (int(x) for x in torch.randint(0, 6, (2,), generator=g))
            rows.append({"instruction": "add", "input": f"{a} plus {b}", "output": NUMBERS[a + b]})
    return rows


class Recorder(SFTCallback):
    """Records every event with its arguments."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_train_begin(self, trainer, **kw):
        self.events.append(("train_begin",))

    def on_epoch_begin(self, trainer, epoch, **kw):
        self.events.append(("epoch_begin", epoch))

    def on_step_end(self, trainer, step, metrics, **kw):
        self.events.append(("step_end", step, dict(metrics)))

    def on_epoch_end(self, trainer, epoch, metrics, **kw):
        self.events.append(("epoch_end", epoch, dict(metrics)))

    def on_train_end(self, trainer, **kw):
        self.events.append(("train_end", kw.get("error")))

    def step_metrics(self) -> list[dict]:
        return [e[2] for e in self.events if e[0] == "step_end"]


def make_config(tmp_path: Path, model_dir: Path, **overrides) -> SFTConfig:
    settings = dict(
        base_model=str(model_dir),
        dataset_format="alpaca",
        output_dir=str(tmp_path / "out"),
        max_seq_length=64,
        batch_size=4,
        learning_rate=3e-3,
        max_steps=8,
        validation_split=0.0,
        logging_steps=1,
        save_steps=1000,
        eval_steps=1000,
        warmup_ratio=0.0,
        disable_progress_bar=True,
        seed=0,
        use_lora=False,
        audit_max_duplicate_share=1.0,  # the synthetic task repeats rows; test_audit.py tests the leakage check
    )
    settings.update(overrides)
    return SFTConfig(**settings)


class _Examples(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_per_step_loss_matches_transformers_trainer(tmp_path, tiny_model_dir):
    """Same weights, same batches in the same order, same optimizer and schedule, on the same device (the GPU when
    there is one), in fp32: the same 20 losses."""
    steps, batch_size = 20, 4
    config = make_config(
        tmp_path,
        tiny_model_dir,
        mixed_precision=None,
        max_steps=steps,
        batch_size=batch_size,
        learning_rate=1e-3,
        warmup_ratio=0.1,
        scheduler_type="cosine",
        max_grad_norm=1.0,
    )
    recorder = Recorder()
    ours = SFTTrainer(
        config,
        callbacks=[recorder],
        model=tiny_llama(seed=0),
        tokenizer=build_tiny_tokenizer(),
        train_dataset=instruction_rows(64),
    )
    lengths = ours.train_data.lengths
    order = [
        i
        for epoch in range(2)
        for batch in epoch_batches(lengths, batch_size=batch_size, epoch=epoch, seed=config.seed)
        for i in batch
    ]
    examples = [ours.train_data[i] for i in order][: steps * batch_size]
    ours.train()
    our_losses = [m["loss"] for m in recorder.step_metrics()]

    class InOrder(Trainer):
        recorded: list[float] = []

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            self.recorded.append(float(loss.detach()))
            return loss

    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        learning_rate=1e-3,
        warmup_steps=0.1,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        disable_tqdm=True,
    )
    hf = InOrder(
        model=tiny_llama(seed=0),
        args=args,
        train_dataset=_Examples(examples),
        data_collator=PaddedCollator(pad_token_id=0),
    )
    hf.train()
    assert len(our_losses) == len(hf.recorded) == steps
    for step, (a, b) in enumerate(zip(our_losses, hf.recorded, strict=True), start=1):
        assert a == pytest.approx(b, rel=1e-4), f"step {step}: ours {a} vs transformers {b}"


def test_validation_loss_halves_on_a_small_instruction_task(tmp_path, tiny_model_dir):
    config = make_config(
        tmp_path,
        tiny_model_dir,
        max_steps=40,
        batch_size=8,
        learning_rate=1e-2,
        eval_steps=40,
        warmup_ratio=0.05,
    )
    trainer = SFTTrainer(
        config,
        model=tiny_llama(seed=0),
        tokenizer=build_tiny_tokenizer(),
        train_dataset=instruction_rows(160, seed=1),
        eval_dataset=instruction_rows(40, seed=2),
    )
    validation = ValidationCallback(val_dataset=instruction_rows(40, seed=2), eval_steps=40)
    trainer.add_callback(validation)
    before = validation._run_validation(trainer)
    result = trainer.train()
    assert result["best_val_loss"] is not None
    assert result["best_val_loss"] < before / 2, (before, result["best_val_loss"])


def test_events_fire_in_order_with_the_documented_metrics(tmp_path, tiny_model_dir):
    recorder = Recorder()
    config = make_config(tmp_path, tiny_model_dir, max_steps=None, num_epochs=2, batch_size=4, eval_steps=3)
    trainer = SFTTrainer(
        config,
        callbacks=[recorder],
        model=tiny_llama(),
        tokenizer=build_tiny_tokenizer(),
        train_dataset=instruction_rows(16),
        eval_dataset=instruction_rows(8, seed=5),
    )
    result = trainer.train()
    kinds = [e[0] for e in recorder.events]
    assert kinds == [
        "train_begin",
        "epoch_begin",
        *["step_end"] * 4,
        "epoch_end",
        "epoch_begin",
        *["step_end"] * 4,
        "epoch_end",
        "train_end",
    ]
    steps = recorder.step_metrics()
    for metrics in steps:
        assert {
            "loss",
            "learning_rate",
            "grad_norm",
            "tokens",
            "tokens_per_second",
            "epoch",
        } <= metrics.keys()
        assert metrics["tokens"] > 0 and math.isfinite(metrics["loss"])
    assert [("val_loss" in m) for m in steps] == [False, False, True, False, False, True, False, False]
    assert steps[-1]["epoch"] == pytest.approx(2.0)
    assert recorder.events[-1] == ("train_end", None)
    assert result["global_step"] == 8 and result["epochs"] == pytest.approx(2.0)
    assert result["train_tokens"] == sum(m["tokens"] for m in steps)


def test_outputs_are_loadable_and_summarised(tmp_path, tiny_model_dir):
    config = make_config(
        tmp_path, tiny_model_dir, use_lora=True, lora_r=4, max_steps=3, save_merged_model=True, eval_steps=3
    )
    trainer = SFTTrainer(config, train_dataset=instruction_rows(16), eval_dataset=instruction_rows(8, seed=3))
    result = trainer.train()
    out = Path(result["output_dir"])
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "metrics.jsonl",
        "training_summary.json",
        "config.yaml",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["global_step"] == 3 and summary["stop_reason"] == "max_steps"
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    ids = torch.tensor([[4, 5, 6, 7]])
    expected = trainer.model.eval()(input_ids=ids).logits
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in records if r["type"] == "eval"] == [3]


def test_non_finite_loss_stops_with_the_step_and_keeps_checkpoints(tmp_path, tiny_model_dir):
    class Poison(SFTCallback):
        def on_step_end(self, trainer, step, metrics, **kw):
            if step == 2:
                with torch.no_grad():
                    next(trainer.model.parameters()).fill_(float("nan"))

    recorder = Recorder()
    config = make_config(tmp_path, tiny_model_dir, save_steps=1, max_steps=5)
    trainer = SFTTrainer(
        config,
        callbacks=[Poison(), recorder],
        model=tiny_llama(),
        tokenizer=build_tiny_tokenizer(),
        train_dataset=instruction_rows(16),
    )
    with pytest.raises(FloatingPointError, match="step 3"):
        trainer.train()
    assert isinstance(recorder.events[-1][1], FloatingPointError)
    checkpoint = Path(config.resolved_checkpoint_dir) / "checkpoint_step_2"
    assert (checkpoint / "trainer_state.json").is_file()
    assert (Path(config.resolved_checkpoint_dir) / "latest").read_text().strip() == "checkpoint_step_2"


def test_callbacks_added_from_the_config(tmp_path, tiny_model_dir):
    from app.sft import CheckpointCallback, EarlyStoppingCallback

    config = make_config(tmp_path, tiny_model_dir, max_steps=2, early_stopping_patience=2, eval_steps=1)
    trainer = SFTTrainer(
        config,
        model=tiny_llama(),
        tokenizer=build_tiny_tokenizer(),
        train_dataset=instruction_rows(16),
        eval_dataset=instruction_rows(4),
    )
    trainer.train()
    kinds = [type(cb) for cb in trainer.callbacks]
    assert kinds == [ValidationCallback, EarlyStoppingCallback, CheckpointCallback]


def test_given_callback_of_a_kind_replaces_the_default(tmp_path, tiny_model_dir):
    from app.sft import CheckpointCallback

    mine = CheckpointCallback(tmp_path / "mine", save_steps=1)
    config = make_config(tmp_path, tiny_model_dir, max_steps=2)
    trainer = SFTTrainer(
        config,
        callbacks=[mine],
        model=tiny_llama(),
        tokenizer=build_tiny_tokenizer(),
        train_dataset=instruction_rows(16),
    )
    trainer.train()
    assert [cb for cb in trainer.callbacks if isinstance(cb, CheckpointCallback)] == [mine]
    assert len(mine.checkpoints) == 2


def test_missing_training_data_is_a_clear_error(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir)
    with pytest.raises(ValueError, match="dataset_name"):
        SFTTrainer(config, model=tiny_llama(), tokenizer=build_tiny_tokenizer())


def test_final_checkpoint_is_the_best_when_only_the_epoch_end_validates(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, max_steps=None, num_epochs=1, eval_steps=1000)
    trainer = SFTTrainer(config, model=tiny_llama(), tokenizer=build_tiny_tokenizer(),
                         train_dataset=instruction_rows(16), eval_dataset=instruction_rows(8, seed=4))
    result = trainer.train()
    last = Path(config.resolved_checkpoint_dir) / "checkpoint_step_4"
    assert result["best_checkpoint"] == str(last)
    assert (last.parent / "best").read_text().strip() == last.name


def test_max_seq_length_beyond_the_models_positions_warns(tmp_path, tiny_model_dir):
    from app.sft.errors import ConfigWarning

    config = make_config(tmp_path, tiny_model_dir, max_seq_length=512)  # tiny_llama has 256 positions
    with pytest.warns(ConfigWarning, match=r"max_seq_length 512 .* max_position_embeddings 256"):
        SFTTrainer(config, model=tiny_llama(), tokenizer=build_tiny_tokenizer(), train_dataset=instruction_rows(8))
