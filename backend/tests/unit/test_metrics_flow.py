"""One path for metrics and one record of the best: `on_evaluate`, `monitor`/`mode`, the trainer saves and
callbacks decide; a run folder that can be copied, resumed exactly and finished after a crash."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import build_tiny_tokenizer, read_wandb_runs, tiny_llama
from test_resume import SignalAt, lora_config, run, trained_weights
from test_trainer import instruction_rows

from app.sft import SFTCallback, SFTTrainer
from app.sft.callbacks import CheckpointCallback, EarlyStoppingCallback, ValidationCallback, WandBCallback
from app.sft.callbacks.base import publish_evaluation
from app.sft.metrics_log import read_metrics


class ScriptedEval(SFTCallback):
    """An evaluator that reports `score` values from a script, at the steps the script names."""

    def __init__(self, scores: dict[int, float]) -> None:
        self.scores = scores

    def on_step_end(self, trainer, step, metrics, **kw):
        if step in self.scores:
            metrics["score"] = self.scores[step]
            publish_evaluation(trainer, step, {"score": self.scores[step]})


class EventOrder(SFTCallback):
    def __init__(self, name: str, order: int, log: list) -> None:
        self.name, self.order, self.log = name, order, log

    def on_step_end(self, trainer, step, metrics, **kw):
        self.log.append((self.name, "step_end", step))

    def on_evaluate(self, trainer, step, metrics, **kw):
        self.log.append((self.name, "evaluate", step, sorted(metrics)))

    def on_save(self, trainer, step, checkpoint_path, **kw):
        self.log.append((self.name, "save", step))


def trainer_for(config, callbacks=()):
    return SFTTrainer(config, callbacks=list(callbacks), model=tiny_llama(seed=0), tokenizer=build_tiny_tokenizer(),
                      train_dataset=instruction_rows(20), eval_dataset=instruction_rows(8, seed=9))


def checkpoint_state(config, step: int) -> dict:
    path = Path(config.resolved_checkpoint_dir) / f"checkpoint_step_{step}" / "trainer_state.json"
    return json.loads(path.read_text())


def test_save_best_only_compares_the_newest_evaluation_also_from_a_step_that_saved_nothing(tmp_path, tiny_model_dir):
    config = lora_config(tmp_path, tiny_model_dir, "a", max_steps=8, eval_steps=1000)
    saver = CheckpointCallback(config.resolved_checkpoint_dir, save_steps=5, save_best_only=True,
                               save_total_limit=None, monitor="score", mode="max")
    _, _, result = run(config, callbacks=[ScriptedEval({2: 0.5, 4: 0.9, 6: 0.3, 8: 0.4}), saver])
    root = Path(config.resolved_checkpoint_dir)
    assert sorted(p.name for p in root.glob("checkpoint_step_*")) == ["checkpoint_step_5"]
    assert (result["best_metric_name"], result["best_metric"], result["best_step"]) == ("score", 0.9, 4)
    assert result["best_checkpoint"] == str(root / "checkpoint_step_5")
    assert (root / "best").read_text().strip() == "checkpoint_step_5"
    assert saver.best_val_loss == 0.9 and saver.best_checkpoint == str(root / "checkpoint_step_5")


def test_monitor_min_on_val_loss_picks_the_lowest_evaluation_and_rotation_keeps_it(tmp_path, tiny_model_dir):
    config = lora_config(tmp_path, tiny_model_dir, "b", max_steps=12, eval_steps=2, save_steps=2,
                         save_total_limit=1, learning_rate=3e-2)
    run(config)
    records = read_metrics(Path(config.output_dir) / "metrics.jsonl")
    evals = [(r["step"], r["val_loss"]) for r in records if r["type"] == "eval"]
    assert [step for step, _ in evals] == [2, 4, 5, 6, 8, 10, 12]  # one per evaluation (epoch ends: 5, 10)
    best_step, best_loss = min(evals, key=lambda e: e[1])
    summary = json.loads((Path(config.output_dir) / "training_summary.json").read_text())
    assert (summary["best_step"], summary["best_val_loss"]) == (best_step, pytest.approx(best_loss))
    root = Path(config.resolved_checkpoint_dir)
    kept = sorted(p.name for p in root.glob("checkpoint_step_*"))
    assert f"checkpoint_step_{best_step}" in kept and "checkpoint_step_12" in kept and len(kept) <= 2
    state = checkpoint_state(config, 12)
    assert state["trainer"]["best_checkpoint"] == f"checkpoint_step_{best_step}"
    assert state["trainer"]["best_step"] == best_step
    assert state["callbacks"]["CheckpointCallback"] == {} and state["callbacks"]["ValidationCallback"] == {}


def test_a_max_mode_metric_from_a_custom_callback_selects_the_best_checkpoint(tmp_path, tiny_model_dir):
    config = lora_config(tmp_path, tiny_model_dir, "c", max_steps=6, save_steps=2, save_total_limit=1,
                         best_metric="score", best_metric_mode="max")
    _, _, result = run(config, callbacks=[ScriptedEval({2: 0.1, 4: 0.8, 6: 0.2})])
    assert (result["best_step"], result["best_metric"]) == (4, 0.8)
    root = Path(config.resolved_checkpoint_dir)
    assert sorted(p.name for p in root.glob("checkpoint_step_*")) == ["checkpoint_step_4", "checkpoint_step_6"]


def test_on_save_reaches_every_callback_after_on_step_end(tmp_path, tiny_model_dir):
    log: list = []
    config = lora_config(tmp_path, tiny_model_dir, "d", max_steps=4, save_steps=2, eval_steps=2)
    run(config, callbacks=[EventOrder("early", 5, log), EventOrder("late", 95, log)])
    for step in (2, 4):
        step_ends = [i for i, e in enumerate(log) if e[1] == "step_end" and e[2] == step]
        saves = [i for i, e in enumerate(log) if e[1] == "save" and e[2] == step]
        assert len(step_ends) == 2 and len(saves) == 2 and min(saves) > max(step_ends)
        evaluations = [e for e in log if e[1] == "evaluate" and e[2] == step]
        assert {e[0] for e in evaluations} == {"early", "late"}
        assert evaluations[0][3] == ["best_val_loss", "val_loss", "val_perplexity"]


def test_an_epoch_end_validation_off_the_eval_grid_is_logged_and_can_be_the_best(tmp_path, tiny_model_dir):
    config = lora_config(tmp_path, tiny_model_dir, "e", max_steps=2, eval_steps=100, save_steps=100)
    _, _, result = run(config)
    records = read_metrics(Path(config.output_dir) / "metrics.jsonl")
    assert [r["step"] for r in records if r["type"] == "eval"] == [2]
    root = Path(config.resolved_checkpoint_dir)
    assert result["best_step"] == 2 and result["best_checkpoint"] == str(root / "checkpoint_step_2")
    assert (root / "best").read_text().strip() == "checkpoint_step_2"
    report = (Path(config.output_dir) / "report.html").read_text()
    assert "No validation in this run" not in report and "(step 2)" in report


def test_the_best_survives_a_resume_once_in_one_place(tmp_path, tiny_model_dir):
    full_config = lora_config(tmp_path, tiny_model_dir, "full", max_steps=8, eval_steps=2)
    _, _, full = run(full_config)
    config = lora_config(tmp_path, tiny_model_dir, "cut", max_steps=8, eval_steps=2)
    run(config, callbacks=[SignalAt(5)])
    _, _, resumed = run(config, resume="latest")
    for key in ("best_step", "best_val_loss", "best_metric", "global_step", "epochs"):
        assert resumed[key] == pytest.approx(full[key]), key
    assert Path(resumed["best_checkpoint"]).name == Path(full["best_checkpoint"]).name
    saved = checkpoint_state(config, 8)
    assert "best_val_loss" not in json.dumps(saved["callbacks"])


def test_resume_is_exact_from_every_step_of_a_two_epoch_run_with_evaluation(tmp_path, tiny_model_dir):
    """20 rows in batches of 4: 5 steps an epoch, evaluation every 5 steps, so step 5 is an epoch's last
    step and an evaluation step at once."""
    settings = dict(max_steps=None, num_epochs=2, eval_steps=5, save_total_limit=None)
    reference, recorder, _ = run(lora_config(tmp_path, tiny_model_dir, "ref", **settings))
    expected_losses = [m["loss"] for m in recorder.step_metrics()]
    expected_weights = trained_weights(reference)
    assert len(expected_losses) == 10
    for stop in range(1, 10):
        config = lora_config(tmp_path, tiny_model_dir, f"stop{stop}", **settings)
        _, first, _ = run(config, callbacks=[SignalAt(stop)])
        trainer, second, _ = run(config, resume="latest")
        losses = [m["loss"] for m in first.step_metrics() + second.step_metrics()]
        assert losses == expected_losses, f"stopped at step {stop}"
        for name, tensor in trained_weights(trainer).items():
            assert torch.equal(tensor, expected_weights[name]), f"stopped at step {stop}: {name}"
        epoch_ends = [e[1] for e in first.events + second.events if e[0] == "epoch_end"]
        assert epoch_ends == [0, 1], f"stopped at step {stop}: epoch ends {epoch_ends}"


def test_a_changed_learning_rate_or_max_steps_on_resume_is_applied(tmp_path, tiny_model_dir, caplog):
    config = lora_config(tmp_path, tiny_model_dir, "lr", max_steps=8, learning_rate=1e-3)
    run(config, callbacks=[SignalAt(4)])
    changed = config.model_copy(update={"learning_rate": 5e-3, "max_steps": 10})
    _, recorder, result = run(changed, resume="latest")
    _, fresh, _ = run(lora_config(tmp_path, tiny_model_dir, "fresh", max_steps=10, learning_rate=5e-3))
    rates = [m["learning_rate"] for m in recorder.step_metrics()]
    assert rates == pytest.approx([m["learning_rate"] for m in fresh.step_metrics()][4:])
    assert result["global_step"] == 10
    saved = json.loads((Path(config.resolved_checkpoint_dir) / "checkpoint_step_10" / "sft_config.json").read_text())
    assert (saved["learning_rate"], saved["max_steps"]) == (5e-3, 10)
    assert "learning_rate 0.001 -> 0.005" in caplog.text and "schedule is recomputed" in caplog.text


def test_a_run_killed_after_its_last_checkpoint_is_finished_by_resume(tmp_path, tiny_model_dir):
    config = lora_config(tmp_path, tiny_model_dir, "died", max_steps=3)
    run(config)
    out = Path(config.output_dir)
    for name in ("training_summary.json", "adapter_model.safetensors", "adapter_config.json", "report.html"):
        (out / name).unlink()  # as if the process died right after the last checkpoint
    _, recorder, result = run(config, resume="latest")
    assert recorder.step_metrics() == [] and result["global_step"] == 3
    for name in ("training_summary.json", "adapter_model.safetensors", "report.html"):
        assert (out / name).is_file(), name


def test_a_copied_run_resumes_on_its_own_and_leaves_the_original_alone(tmp_path, tiny_model_dir):
    original = lora_config(tmp_path, tiny_model_dir, "a", max_steps=6, save_total_limit=1)
    run(original, callbacks=[SignalAt(3)])
    source = Path(original.output_dir)
    before = sorted(p.name for p in (source / "checkpoints").iterdir())
    copy_dir = tmp_path / "b" / "out"
    shutil.copytree(source, copy_dir)
    copy = original.model_copy(update={"output_dir": str(copy_dir)})
    _, _, result = run(copy, resume="latest")
    assert result["global_step"] == 6
    assert sorted(p.name for p in (source / "checkpoints").iterdir()) == before
    assert "checkpoint_step_6" in {p.name for p in (copy_dir / "checkpoints").iterdir()}


def test_a_crafted_trainer_state_cannot_make_rotation_delete_anything_else(tmp_path, tiny_model_dir):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "trainer_state.json").write_text("{}")
    config = lora_config(tmp_path, tiny_model_dir, "x", max_steps=5, save_total_limit=1)
    run(config, callbacks=[SignalAt(2)])
    state_file = Path(config.resolved_checkpoint_dir) / "checkpoint_step_2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["callbacks"]["CheckpointCallback"] = {"checkpoints": [str(victim), "../../../victim"],
                                               "best_checkpoint": str(victim)}
    state["trainer"]["best_checkpoint"] = "../../../victim"
    state_file.write_text(json.dumps(state))
    _, _, result = run(config, resume="latest")
    assert result["global_step"] == 5 and (victim / "trainer_state.json").is_file()


def test_early_stopping_and_a_checkpoint_monitor_one_metric_through_on_evaluate(tmp_path, tiny_model_dir):
    config = lora_config(tmp_path, tiny_model_dir, "es", max_steps=10, eval_steps=1000,
                         best_metric="score", best_metric_mode="max")
    stopper = EarlyStoppingCallback(patience=2, monitor="score", mode="max")
    _, _, result = run(config, callbacks=[ScriptedEval({1: 0.2, 2: 0.5, 3: 0.4, 4: 0.45, 5: 0.9}), stopper])
    assert (result["global_step"], result["stop_reason"]) == (4, "early_stopping")
    assert (result["best_step"], result["best_metric"]) == (2, 0.5)



def test_every_callbacks_best_reads_the_trainers_one_record(tmp_path, tiny_model_dir):
    config = lora_config(tmp_path, tiny_model_dir, "one", max_steps=6, eval_steps=2, save_steps=2,
                         best_metric="score", best_metric_mode="max", early_stopping_patience=5)
    trainer, _, result = run(config, callbacks=[ScriptedEval({2: 0.3, 4: 0.6, 6: 0.5})])
    validation, stopper, saver = (next(cb for cb in trainer.callbacks if isinstance(cb, kind))
                                  for kind in (ValidationCallback, EarlyStoppingCallback, CheckpointCallback))
    assert (trainer.state.best_metric, trainer.state.best_step) == (0.6, 4)
    assert stopper.monitor == "score" and stopper.best == 0.6 and stopper.wait_count == 1
    root = Path(config.resolved_checkpoint_dir)
    assert (saver.best_val_loss, saver.best_checkpoint) == (0.6, str(root / "checkpoint_step_4"))
    evals = [(r["step"], r["val_loss"]) for r in read_metrics(Path(config.output_dir) / "metrics.jsonl")
             if r["type"] == "eval" and "val_loss" in r]
    lowest_step, lowest = min(evals, key=lambda e: e[1])
    assert (validation.best_step, validation.best_val_loss, result["best_val_loss"]) == (lowest_step, lowest, lowest)
    assert (result["best_metric_name"], result["best_metric_mode"]) == ("score", "max")
    saved = checkpoint_state(config, 6)["callbacks"]
    assert saved["EarlyStoppingCallback"] == {"wait_count": 1, "stopped_step": None}  # no copy of the best
    assert saved["ValidationCallback"] == {} and saved["CheckpointCallback"] == {}



def test_early_stopping_counts_min_delta_from_the_runs_best_of_the_earlier_evaluations(tmp_path, tiny_model_dir):
    """Each score beats the run's best before it by 0.05 only, never by min_delta 0.1: three checks, stop."""
    config = lora_config(tmp_path, tiny_model_dir, "delta", max_steps=8, eval_steps=1000, best_metric="score",
                         best_metric_mode="max", early_stopping_patience=3, early_stopping_min_delta=0.1)
    _, _, result = run(config, callbacks=[ScriptedEval({1: 0.2, 2: 0.25, 3: 0.3, 4: 0.35, 5: 0.9})])
    assert (result["global_step"], result["stop_reason"]) == (4, "early_stopping")
    assert (result["best_step"], result["best_metric"]) == (4, 0.35)


def test_a_given_checkpoint_callbacks_monitor_is_the_runs_and_the_defaults_follow_it(tmp_path, tiny_model_dir,
                                                                                    caplog):
    config = lora_config(tmp_path, tiny_model_dir, "given", max_steps=10, eval_steps=1000, early_stopping_patience=2)
    saver = CheckpointCallback(config.resolved_checkpoint_dir, save_steps=1, save_total_limit=None,
                               monitor="score", mode="max")
    with caplog.at_level(logging.INFO, logger="app.sft"):
        trainer, _, result = run(config, callbacks=[ScriptedEval({1: 0.2, 2: 0.5, 3: 0.4, 4: 0.45, 5: 0.9}), saver])
    stopper = next(cb for cb in trainer.callbacks if isinstance(cb, EarlyStoppingCallback))
    assert (stopper.monitor, stopper.mode) == ("score", "max")  # built from the run's monitor, not the config's
    assert (result["global_step"], result["stop_reason"]) == (4, "early_stopping")
    assert (result["best_metric_name"], result["best_metric"], result["best_step"]) == ("score", 0.5, 2)
    said = [r.getMessage() for r in caplog.records if "config's best_metric" in r.getMessage()]
    assert len(said) == 1 and "score (max)" in said[0] and "val_loss (min)" in said[0]


def test_checkpoints_reach_wandb_as_model_artifacts(tmp_path, tiny_model_dir, wandb_offline):
    config = lora_config(tmp_path, tiny_model_dir, "w", max_steps=2, save_steps=1)
    wandb_cb = WandBCallback(log_model=True)
    run(config, callbacks=[wandb_cb])
    log = read_wandb_runs(wandb_offline)[-1]
    assert log.artifacts == [(f"model-{wandb_cb.run_id}", "model")] * 2
    assert 2 in log.history and "val_loss" in log.history[2]


def test_wandb_offline_files_go_inside_the_run_folder(tmp_path, tiny_model_dir, wandb_offline, monkeypatch):
    """Without WANDB_DIR, W&B writes into the run's output_dir, never into the current directory."""
    monkeypatch.delenv("WANDB_DIR")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config = lora_config(tmp_path, tiny_model_dir, "w", max_steps=2)
    run(config, callbacks=[WandBCallback()])
    assert list(cwd.iterdir()) == []
    (log,) = read_wandb_runs(config.output_dir)
    assert sorted(log.history) == [1, 2]
