"""Tracking and visibility: the metrics log, the HTML/PNG report and the TensorBoard callback."""

from __future__ import annotations

import base64
import json
import logging
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from app.sft.callbacks.base import CallbackHandler, SFTCallback
from app.sft.callbacks.tensorboard import TensorBoardCallback
from app.sft.metrics_log import MetricsLog, read_metrics
from app.sft.report import render_report

# --- metrics.jsonl ---------------------------------------------------------------------------------


def test_metrics_log_writes_one_strict_json_record_per_call(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"  # the parent folder is created
    before = time.time()
    log = MetricsLog(path)
    log.write("train", 1, {"loss": torch.tensor(2.5), "learning_rate": np.float32(1e-4), "tokens": 96}, 0.25)
    log.write("eval", 1, {"val_loss": float("nan"), "note": "ok", "is_best": True, "hist": [1, 2]}, 0.25)
    log.write("epoch", 2, {"loss": float("inf"), "step": 99}, epoch=None)
    log.close()

    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    for line in lines:  # strict JSON: no NaN/Infinity literals that other readers reject
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    train, val, epoch = read_metrics(path)
    assert train["type"] == "train" and train["step"] == 1 and train["epoch"] == 0.25
    assert train["loss"] == 2.5 and train["learning_rate"] == pytest.approx(1e-4) and train["tokens"] == 96
    assert before <= train["time"] <= time.time()
    assert 0 <= train["elapsed_s"] <= val["elapsed_s"] <= epoch["elapsed_s"]
    assert val["val_loss"] is None and val["note"] == "ok" and val["is_best"] is True
    assert "hist" not in val  # not a number, bool or string: dropped
    assert epoch["type"] == "epoch" and epoch["epoch"] is None and epoch["loss"] is None
    assert epoch["step"] == 2  # a metric cannot overwrite the record's own fields


def test_metrics_log_rejects_unknown_record_type(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    with pytest.raises(ValueError, match="type must be one of"):
        log.write("validation", 1, {"loss": 1.0}, epoch=0.1)


def _write_steps(path: Path, steps: range, **kwargs: Any) -> MetricsLog:
    log = MetricsLog(path, **kwargs)
    for step in steps:
        log.write("train", step, {"loss": 10.0 - step}, epoch=step / 10)
        if step % 4 == 0:
            log.write("eval", step, {"val_loss": 20.0 - step}, epoch=step / 10)
    return log


def test_new_metrics_log_starts_a_fresh_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _write_steps(path, range(1, 6)).close()
    _write_steps(path, range(1, 3)).close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_resumed_metrics_log_drops_records_after_the_checkpoint_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    interrupted = [
        {"type": kind, "step": step, "epoch": step / 10, "time": 0.0, "elapsed_s": 60.0 * step, "loss": 1.0}
        for step in range(1, 11)
        for kind in (("train", "eval") if step % 4 == 0 else ("train",))
    ]
    lines = "".join(json.dumps(record) + "\n" for record in interrupted)
    path.write_text(lines + '{"type": "train", "step": 11, "lo', encoding="utf-8")  # died mid-write

    _write_steps(path, range(9, 11), resume_from_step=8).close()

    records = read_metrics(path)
    assert [(r["type"], r["step"]) for r in records] == [
        *[("train", s) for s in range(1, 4)], ("train", 4), ("eval", 4),
        *[("train", s) for s in range(5, 8)], ("train", 8), ("eval", 8),
        ("train", 9), ("train", 10),
    ]  # fmt: skip
    assert records[-1]["loss"] == 10.0 - 10  # the resumed run's record, not the interrupted one's
    assert 480.0 <= records[-1]["elapsed_s"] < 490.0  # elapsed time carries on from step 8's 480 s
    assert not list(tmp_path.glob(".metrics.jsonl.*"))  # the atomic rewrite left no temporary file


def test_resume_without_an_existing_log_starts_one(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _write_steps(path, range(5, 7), resume_from_step=4).close()
    assert [r["step"] for r in read_metrics(path)] == [5, 6]


def test_read_metrics_ignores_a_final_partial_line_but_not_a_damaged_middle(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    good = json.dumps({"type": "train", "step": 1, "loss": 2.0})
    path.write_text(f"{good}\n{good}\n" + '{"type": "tr', encoding="utf-8")
    assert len(read_metrics(path)) == 2

    path.write_text(f"{good}\n{{broken\n{good}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        read_metrics(path)


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs Linux's /dev/full device")
def test_metrics_log_write_failure_warns_once_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    log = MetricsLog("/dev/full")  # every write fails with ENOSPC, like a full disk
    with caplog.at_level(logging.WARNING, logger="app.sft.metrics_log"):
        for step in range(1, 4):
            log.write("train", step, {"loss": 1.0}, epoch=0.1)
        log.close()
    warnings = [r for r in caplog.records if "metrics log" in r.getMessage()]
    assert len(warnings) == 1
    assert "/dev/full" in warnings[0].getMessage()


# --- report.html / loss.png ------------------------------------------------------------------------


def _train_loss(step: int) -> float:
    return 0.8 + 2.4 * math.exp(-step / 12) + 0.08 * math.sin(1.7 * step)


def _val_loss(step: int) -> float:
    return 1.0 + 2.2 * math.exp(-step / 14)


def _realistic_run(output_dir: Path, *, with_validation: bool) -> None:
    """50 steps of a decaying, noisy loss with warmup + cosine LR, evals every 10 steps, 2 epochs."""
    log = MetricsLog(output_dir / "metrics.jsonl")
    for step in range(1, 51):
        lr = 2e-4 * min(1.0, step / 5) * 0.5 * (1 + math.cos(math.pi * max(0, step - 5) / 45))
        speed = 1800 + 60 * math.sin(step)
        metrics = {"loss": _train_loss(step), "learning_rate": lr, "tokens": 2000, "tokens_per_second": speed}
        log.write("train", step, metrics, epoch=step / 25)
        if with_validation and step % 10 == 0:
            log.write("eval", step, {"val_loss": _val_loss(step)}, epoch=step / 25)
        if step % 25 == 0:
            log.write("epoch", step, {"loss": _train_loss(step)}, epoch=step / 25)
    log.close()


def _summary_cell(page: str, label: str) -> str:
    start = page.index(f"<th>{label}</th><td>") + len(f"<th>{label}</th><td>")
    return page[start : page.index("</td>", start)]


def test_report_renders_curves_summary_and_config(tmp_path: Path) -> None:
    _realistic_run(tmp_path, with_validation=True)
    (tmp_path / "config.yaml").write_text("base_model: tiny <llama>\nlearning_rate: 2e-4\n", encoding="utf-8")
    summary = {"train_tokens": 100000, "runtime_s": 125.0, "global_step": 50}
    (tmp_path / "training_summary.json").write_text(json.dumps(summary), encoding="utf-8")

    png_path, html_path = render_report(tmp_path, title="Tiny run")

    assert (png_path, html_path) == (tmp_path / "loss.png", tmp_path / "report.html")
    png = png_path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from matplotlib.image import imread

    height, width, _ = imread(png_path).shape
    assert width > 1000 and height > 700  # 2x2 panels, readable

    page = html_path.read_text(encoding="utf-8")
    assert f"data:image/png;base64,{base64.b64encode(png).decode('ascii')}" in page  # self-contained
    assert "<title>Tiny run</title>" in page
    assert _summary_cell(page, "Best validation loss") == f"{_val_loss(50):.4g} (step 50)"
    assert _summary_cell(page, "Last logged training loss") == f"{_train_loss(50):.4g} (step 50)"
    assert _summary_cell(page, "Optimizer steps") == "50"
    assert _summary_cell(page, "Trained tokens") == "100,000"
    assert _summary_cell(page, "Runtime") == "2m 05s"
    assert "base_model: tiny &lt;llama&gt;" in page  # the config, HTML-escaped
    assert "&quot;train_tokens&quot;: 100000" in page


def test_report_without_validation(tmp_path: Path) -> None:
    _realistic_run(tmp_path, with_validation=False)
    png_path, html_path = render_report(str(tmp_path))
    page = html_path.read_text(encoding="utf-8")
    assert png_path.stat().st_size > 10_000
    assert _summary_cell(page, "Best validation loss") == "—"
    assert _summary_cell(page, "Final validation loss") == "—"
    assert _summary_cell(page, "Optimizer steps") == "50"
    assert f"<title>Training report: {tmp_path.name}</title>" in page
    assert "Configuration" not in page  # no config.yaml in this run directory


def test_report_needs_a_metrics_log(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        render_report(tmp_path)


def test_report_without_matplotlib_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _realistic_run(tmp_path, with_validation=True)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes `import matplotlib.figure` fail
    with pytest.raises(ImportError, match=r"pip install 'llm-playground-sft\[report\]'"):
        render_report(tmp_path)


def _edit_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[number - 1] = text
    path.write_text("\n".join(lines), encoding="utf-8")


@pytest.mark.parametrize(("file", "line", "text", "said"), [
    ("metrics.jsonl", 3, '{"type": "train", "step": 2, "loss": 1.', "metrics.jsonl:3: malformed metrics record"),
    ("metrics.jsonl", 2, '[1, 2]', "metrics.jsonl:2: a record must be a JSON object"),
    ("metrics.jsonl", 4, '{"type": "train", "step": "four", "loss": 1.0}', "metrics.jsonl:4: field 'step'"),
    ("metrics.jsonl", 5, '{"type": "train", "step": 5, "loss": "low"}', "metrics.jsonl:5: field 'loss'"),
    ("metrics.jsonl", 6, '{"type": "lunch", "step": 6}', "metrics.jsonl:6: field 'type'"),
    ("training_summary.json", 1, '{"global_step": 5', "training_summary.json: not valid JSON"),
    ("training_summary.json", 1, '[5]', "training_summary.json: expected a JSON object"),
    ("config.yaml", 1, "base_model: [", "config.yaml: invalid YAML"),
])
def test_report_of_edited_or_damaged_files_is_one_message_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], file: str, line: int, text: str, said: str
) -> None:
    from app.sft.cli import main

    _realistic_run(tmp_path, with_validation=True)
    (tmp_path / "training_summary.json").write_text('{"global_step": 50}', encoding="utf-8")
    (tmp_path / "config.yaml").write_text("base_model: tiny\n", encoding="utf-8")
    _edit_line(tmp_path / file, line, text)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert said in err and str(tmp_path) in err and "Traceback" not in err, err


def test_report_on_a_full_disk_is_one_message_and_keeps_the_previous_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    from app.sft.cli import main

    _realistic_run(tmp_path, with_validation=True)
    (tmp_path / "report.html").write_text("earlier report", encoding="utf-8")

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("app.sft.atomic.os.fdopen", full)  # the one writer
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "loss.png" in err and "Traceback" not in err
    assert (tmp_path / "report.html").read_text(encoding="utf-8") == "earlier report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "report.html"]

    monkeypatch.undo()  # the report fits; the model card (README.md) does not
    (tmp_path / "training_summary.json").write_text('{"global_step": 50}', encoding="utf-8")
    monkeypatch.setattr("app.sft.model_card.write_text", full)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'README.md'}: cannot write the model card (No space left on device)" in err


# --- TensorBoard -----------------------------------------------------------------------------------


class _Config:
    def to_dict(self) -> dict[str, Any]:
        return {"learning_rate": 2e-4, "lora_target_modules": ["q_proj", "v_proj"], "run_name": None}


class _FakeValidation(SFTCallback):
    """Stands in for ValidationCallback (order 0): puts `val_loss` into the step metrics every 2 steps."""

    order = 0

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float], **kwargs: Any) -> None:
        if step % 2 == 0:
            metrics["val_loss"] = 5.0 - step


def _trainer(tmp_path: Path, global_step: int = 0, **extra: Any) -> SimpleNamespace:
    return SimpleNamespace(output_dir=str(tmp_path), is_main_process=True, global_step=global_step, **extra)


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_tensorboard_writes_step_eval_and_epoch_scalars(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, config=_Config())
    handler = CallbackHandler([TensorBoardCallback(), _FakeValidation()])  # loggers run last anyway
    handler.fire("on_train_begin", trainer)
    for step in range(1, 5):
        trainer.global_step = step
        metrics = {"loss": torch.tensor(10.0 - step), "learning_rate": 1e-4 * step, "note": "text is skipped"}
        handler.fire("on_step_end", trainer, step=step, metrics=metrics)
    handler.fire("on_epoch_end", trainer, epoch=0, metrics={"loss": 7.5})
    handler.fire("on_train_end", trainer, error=RuntimeError("training failed"))

    log_dir = tmp_path / "tensorboard"
    scalars = _scalars(log_dir)
    assert set(scalars) == {"train/loss", "train/learning_rate", "eval/loss", "epoch/loss"}
    assert scalars["train/loss"] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0)]
    assert [step for step, _ in scalars["train/learning_rate"]] == [1, 2, 3, 4]
    assert scalars["train/learning_rate"][2][1] == pytest.approx(3e-4)
    assert scalars["eval/loss"] == [(2, 3.0), (4, 1.0)]
    assert scalars["epoch/loss"] == [(4, 7.5)]

    events = EventAccumulator(str(log_dir))
    events.Reload()
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| lora_target_modules | `['q_proj', 'v_proj']` |" in config_text
    assert "_hparams_/session_start_info" in events.summary_metadata


class _ConfigWithCredentials:
    def to_dict(self) -> dict[str, Any]:
        return {"mlflow_tracking_uri": "https://bob:hunter2@mlflow.example.com", "datasets": [
            {"path": "https://bob:hunter2@data.example.com/train.jsonl"}]}


def test_tensorboard_writes_the_config_without_credentials(tmp_path: Path) -> None:
    callback = TensorBoardCallback()
    trainer = _trainer(tmp_path, config=_ConfigWithCredentials())
    callback.on_train_begin(trainer)
    callback.on_train_end(trainer)
    written = b"".join(path.read_bytes() for path in (tmp_path / "tensorboard").iterdir())
    assert b"https://mlflow.example.com" in written and b"data.example.com/train.jsonl" in written
    assert b"hunter2" not in written and b"bob" not in written


def test_tensorboard_hand_written_loop_writes_each_epoch_at_its_last_step(tmp_path: Path) -> None:
    callback = TensorBoardCallback()
    trainer = SimpleNamespace(model=None, device="cpu", output_dir=str(tmp_path))  # keeps no global_step
    callback.on_train_begin(trainer)
    for epoch in range(2):
        for step in range(epoch * 3 + 1, epoch * 3 + 4):
            callback.on_step_end(trainer, step, {"loss": 1.0})
        callback.on_epoch_end(trainer, epoch, {"loss": 0.5})
    callback.on_train_end(trainer)
    assert _scalars(tmp_path / "tensorboard")["epoch/loss"] == [(3, 0.5), (6, 0.5)]


def test_tensorboard_never_writes_through_a_linked_folder_in_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tensorboard").symlink_to(elsewhere, target_is_directory=True)
    callback = TensorBoardCallback()
    trainer = SimpleNamespace(model=None, device="cpu", output_dir=str(tmp_path / "out"))
    with caplog.at_level(logging.WARNING, logger="app.sft.callbacks.tensorboard"):
        callback.on_train_begin(trainer)
        callback.on_step_end(trainer, 1, {"loss": 1.0})
        callback.on_train_end(trainer)
    assert list(elsewhere.iterdir()) == []
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "is a symbolic link" in warning and "training goes on" in warning


def test_tensorboard_resume_replaces_steps_after_the_checkpoint(tmp_path: Path) -> None:
    first = TensorBoardCallback(log_dir=str(tmp_path / "tb"))
    trainer = _trainer(tmp_path)
    first.on_train_begin(trainer)
    for step in range(1, 6):
        first.on_step_end(trainer, step, {"loss": 100.0 + step})
    first.on_train_end(trainer, error=KeyboardInterrupt())

    time.sleep(1.1)  # event files sort by their creation second: the resumed run's file must come after
    resumed = TensorBoardCallback(log_dir=str(tmp_path / "tb"))
    trainer = _trainer(tmp_path, global_step=3)  # resumed from the checkpoint of step 3
    resumed.on_train_begin(trainer)
    for step in range(4, 7):
        resumed.on_step_end(trainer, step, {"loss": float(step)})
    resumed.on_train_end(trainer)

    expected = [(1, 101.0), (2, 102.0), (3, 103.0), (4, 4.0), (5, 5.0), (6, 6.0)]
    assert _scalars(tmp_path / "tb")["train/loss"] == expected


def test_tensorboard_writes_nothing_off_the_main_process(tmp_path: Path) -> None:
    callback = TensorBoardCallback()
    trainer = _trainer(tmp_path)
    trainer.is_main_process = False
    callback.on_train_begin(trainer)
    callback.on_step_end(trainer, 1, {"loss": 1.0})
    callback.on_train_end(trainer)
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_failure_warns_once_and_training_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the log directory should be", encoding="utf-8")
    callback = TensorBoardCallback(log_dir=str(blocker))
    trainer = _trainer(tmp_path, config=_Config())
    with caplog.at_level(logging.WARNING, logger="app.sft.callbacks.tensorboard"):
        callback.on_train_begin(trainer)
        for step in range(1, 4):
            callback.on_step_end(trainer, step, {"loss": 1.0})
        callback.on_epoch_end(trainer, 0, {"loss": 1.0})
        callback.on_train_end(trainer)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "TensorBoard" in warnings[0].getMessage() and "training goes on" in warnings[0].getMessage()
    assert callback.writer is None
    assert blocker.read_text(encoding="utf-8") == "a file where the log directory should be"


def _monitored_run(output_dir: Path) -> None:
    """Evaluations at steps 10, 20, 30: `gen_exact_match` is best at step 10, `val_loss` lowest at step 30."""
    log = MetricsLog(output_dir / "metrics.jsonl")
    for step, val_loss, exact in [(10, 0.09, 0.81), (20, 0.05, 0.5), (30, 0.02979, 0.7)]:
        log.write("train", step, {"loss": val_loss, "learning_rate": 1e-4, "tokens_per_second": 100.0}, epoch=0.1)
        log.write("eval", step, {"val_loss": val_loss, "gen_exact_match": exact}, epoch=0.1)
    log.close()


def _drawn_panels(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The figures `render_report` draws, collected as it saves them (their panels' titles and legends)."""
    from matplotlib.figure import Figure

    figures: list[Any] = []
    original = Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def _panel(figure: Any, title_start: str) -> tuple[str, list[str]]:
    ax = next(ax for ax in figure.axes if ax.get_title().startswith(title_start))
    return ax.get_title(), ax.get_legend_handles_labels()[1]


def test_report_marks_and_plots_the_monitored_best_by_its_name(tmp_path: Path, monkeypatch) -> None:
    _monitored_run(tmp_path)
    summary = {"best_metric_name": "gen_exact_match", "best_metric_mode": "max", "best_metric": 0.81,
               "best_step": 10, "best_val_loss": 0.02979, "best_checkpoint": "/x/checkpoint_step_10"}
    (tmp_path / "training_summary.json").write_text(json.dumps(summary), encoding="utf-8")
    figures = _drawn_panels(monkeypatch)
    render_report(tmp_path)

    title, labels = _panel(figures[0], "gen_exact_match")
    assert title == "gen_exact_match (monitored)"
    assert "best gen_exact_match 0.81 at step 10" in labels and not any("0.02979" in label for label in labels)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert _summary_cell(page, "Best gen_exact_match") == "0.81 (step 10)"
    assert _summary_cell(page, "Best checkpoint") == "checkpoint_step_10"
    assert "Best validation loss" not in page.split("<h2>Curves</h2>")[0]
    assert "best evaluation (step 10, by gen_exact_match)" in page


def test_report_without_a_summary_follows_the_configs_monitor_and_mode(tmp_path: Path, monkeypatch) -> None:
    _monitored_run(tmp_path)
    (tmp_path / "config.yaml").write_text("best_metric: gen_exact_match\nbest_metric_mode: max\n", encoding="utf-8")
    figures = _drawn_panels(monkeypatch)
    render_report(tmp_path)
    assert "best gen_exact_match 0.81 at step 10" in _panel(figures[0], "gen_exact_match")[1]
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert _summary_cell(page, "Best gen_exact_match") == "0.81 (step 10)"

    (tmp_path / "config.yaml").unlink()  # no config, no summary: validation loss, lowest is best
    figures.clear()
    render_report(tmp_path)
    title, labels = _panel(figures[0], "Validation loss")
    assert "best val_loss 0.02979 at step 30" in labels
    assert _summary_cell((tmp_path / "report.html").read_text(), "Best validation loss") == "0.02979 (step 30)"
