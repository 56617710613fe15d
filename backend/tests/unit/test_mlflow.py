"""MLflow tracking: the real mlflow client against a local store in tmp_path, read back with `MlflowClient`."""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import pytest
import torch
from mlflow import MlflowClient
from test_resume import SignalAt, lora_config, run

from app.sft import GenerationEvalCallback, MLflowCallback, SFTCallback
from app.sft.metrics_log import read_metrics


@pytest.fixture(autouse=True)
def _no_mlflow_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


class CrashAt(SFTCallback):
    """Fails training at the end of `step`, after the loggers (order 95): a crash between two checkpoints."""

    order = 95

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, step, metrics, **kw):
        if step == self.step:
            raise RuntimeError("crash")


def local_store(config) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{Path(config.output_dir).resolve() / 'mlflow' / 'mlflow.db'}")


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_stopped_crashed_and_resumed_run_is_one_mlflow_run_with_each_step_once(tmp_path, tiny_model_dir):
    config = lora_config(tmp_path, tiny_model_dir, "m", max_steps=6, save_steps=2, eval_steps=2, logging_steps=1,
                         report_to=["mlflow"], mlflow_experiment="tiny-exp", mlflow_log_model=True)
    run(config, callbacks=[SignalAt(1)])  # stopped by a signal: checkpoint 1, no outputs
    client = local_store(config)
    (experiment,) = [e for e in client.search_experiments() if e.name == "tiny-exp"]
    (first,) = client.search_runs([experiment.experiment_id])
    assert first.info.status == "KILLED"
    assert not [a.path for a in client.list_artifacts(first.info.run_id)]
    with pytest.raises(RuntimeError, match="crash"):  # resumed, logs step 3, then crashes after checkpoint 2
        run(config, callbacks=[CrashAt(3)], resume="latest")
    assert client.get_run(first.info.run_id).info.status == "FAILED"
    _, _, result = run(config, resume="latest")  # from checkpoint 2: step 3 again
    assert result["global_step"] == 6

    (mlflow_run,) = client.search_runs([experiment.experiment_id])  # one run throughout
    run_id = mlflow_run.info.run_id
    assert run_id == first.info.run_id and mlflow_run.info.status == "FINISHED"
    params = mlflow_run.data.params
    assert params["learning_rate"] == str(config.learning_rate) and params["lora_r"] == "4"
    assert params["distributed.strategy"] == "auto" and params["report_to"] == "['mlflow']"
    assert params["mixed_precision"] != "auto"  # the config as resolved for this machine
    assert any(key.startswith("epoch/") for key in mlflow_run.data.metrics)

    records = read_metrics(Path(config.output_dir) / "metrics.jsonl")
    losses = [(r["step"], r["loss"]) for r in records if r["type"] == "train"]
    assert [step for step, _ in steps_of(client, run_id, "loss")] == [1, 2, 3, 4, 5, 6]  # each step once
    assert dict(steps_of(client, run_id, "loss")) == pytest.approx(dict(losses))
    val_losses = [(r["step"], r["val_loss"]) for r in records if r["type"] == "eval"]
    assert dict(steps_of(client, run_id, "val_loss")) == pytest.approx(dict(val_losses))
    assert {2, 4, 6} <= {step for step, _ in val_losses}  # and each epoch end

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"training_summary.json", "report.html", "loss.png", "config.yaml", "model"} <= artifacts
    model = {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"model/adapter_model.safetensors", "model/adapter_config.json", "model/tokenizer.json"} <= model
    summary = json.loads(Path(client.download_artifacts(run_id, "training_summary.json", str(tmp_path))).read_text())
    assert summary["global_step"] == 6
    store = (Path(config.output_dir) / "mlflow").resolve()
    assert mlflow_run.info.artifact_uri.startswith(store.as_uri())  # everything stays inside the run folder


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_tracking_server_warns_once_and_training_goes_on(tmp_path, tiny_model_dir, caplog):
    uri = f"http://user:secret@127.0.0.1:{closed_port()}"
    config = lora_config(tmp_path, tiny_model_dir, "u", max_steps=3, report_to=["mlflow"], mlflow_tracking_uri=uri)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        _, _, result = run(config)
    assert time.monotonic() - started < 60  # mlflow's own retries would wait minutes
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "MLflow tracking at http://127.0.0.1" in warning and "MLflow logging is off" in warning
    assert "secret" not in caplog.text
    assert result["global_step"] == 3  # nothing lost: every step and output is in the run folder
    assert [r["step"] for r in read_metrics(Path(config.output_dir) / "metrics.jsonl") if r["type"] == "train"] == [
        1, 2, 3]
    assert (Path(config.output_dir) / "training_summary.json").is_file()
    assert not (Path(config.output_dir) / "mlflow").exists()


def test_without_mlflow_installed_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(__import__("sys").modules, "mlflow", None)
    callback = MLflowCallback()
    trainer = SimpleNamespace(model=None, device="cpu", output_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        callback.on_train_begin(trainer)
        callback.on_step_end(trainer, 1, {"loss": 1.0})
        callback.on_train_end(trainer)
    assert caplog.text.count("mlflow is not installed") == 1 and callback.client is None


def test_a_linked_local_store_is_refused_and_nothing_is_written_there(tmp_path, caplog):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "mlflow").symlink_to(elsewhere, target_is_directory=True)
    callback = MLflowCallback()
    trainer = SimpleNamespace(model=None, device="cpu", output_dir=str(out))
    with caplog.at_level(logging.WARNING):
        callback.on_train_begin(trainer)
    assert callback.client is None and "not a folder of ours" in caplog.text
    assert list(elsewhere.iterdir()) == []


def test_a_crafted_or_unknown_run_id_starts_a_new_run(tmp_path, caplog):
    callback = MLflowCallback()
    callback.load_state_dict({"run_id": "../../etc"})
    assert callback.run_id is None
    callback.load_state_dict({"run_id": "0123456789abcdef0123456789abcdef"})  # not in this store
    trainer = SimpleNamespace(model=None, device="cpu", output_dir=str(tmp_path / "out"))
    with caplog.at_level(logging.WARNING):
        callback.on_train_begin(trainer)
        callback.on_step_end(trainer, 1, {"loss": 2.0, "note": "text is not a metric"})
        callback.on_train_end(trainer)
    assert "not in this tracking store" in caplog.text
    assert callback.run_id != "0123456789abcdef0123456789abcdef"
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'out' / 'mlflow' / 'mlflow.db').resolve()}")
    assert steps_of(client, callback.run_id, "loss") == [(1, 2.0)]
    assert client.get_run(callback.run_id).info.status == "KILLED"  # no summary was written


def test_generation_scores_and_samples_are_logged_at_their_step(tmp_path):
    from test_generation_eval import ANSWER, QUESTION, TASK, train

    callback = GenerationEvalCallback(TASK[:2], metrics=["exact_match"], eval_steps=2, max_new_tokens=6)
    trainer, _ = train(tmp_path, [callback], max_steps=4, report_to=["mlflow"], run_name="gen-run")
    client = local_store(trainer.config)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("llm-playground-sft").experiment_id])
    assert mlflow_run.info.run_name == "gen-run"
    assert [step for step, _ in steps_of(client, mlflow_run.info.run_id, "gen_exact_match")] == [2, 4]
    assert [a.path for a in client.list_artifacts(mlflow_run.info.run_id, "generations")] == [
        "generations/step_2.json", "generations/step_4.json"]
    path = client.download_artifacts(mlflow_run.info.run_id, "generations/step_4.json", str(tmp_path))
    logged = json.loads(Path(path).read_text())
    assert logged["step"] == 4 and [(s["prompt"], s["reference"]) for s in logged["samples"]] == [
        (QUESTION, ANSWER)] * 2


def test_a_database_uri_with_a_password_is_logged_without_it(tmp_path, caplog):
    callback = MLflowCallback(tracking_uri="postgresql://bob:hunter2@127.0.0.1:1/runs")
    trainer = SimpleNamespace(model=None, device="cpu", output_dir=str(tmp_path / "out"))
    with caplog.at_level(logging.INFO):
        callback.on_train_begin(trainer)
        callback.on_train_end(trainer)
    assert "MLflow tracking at postgresql://127.0.0.1:1/runs failed" in caplog.text
    assert "hunter2" not in caplog.text and "bob" not in caplog.text


def test_credentials_in_the_config_are_not_logged_as_params(tmp_path):
    from app.sft.config import SFTConfig

    config = SFTConfig(base_model="tiny", dataset_name="data.jsonl", report_to=["mlflow"],
                       mlflow_tracking_uri="https://bob:hunter2@mlflow.example.com")
    callback = MLflowCallback(tracking_uri=f"sqlite:///{(tmp_path / 'store.db').resolve()}")
    trainer = SimpleNamespace(model=None, device="cpu", output_dir=str(tmp_path / "out"), config=config)
    callback.on_train_begin(trainer)
    callback.on_train_end(trainer)
    params = MlflowClient(tracking_uri=callback.tracking_uri).get_run(callback.run_id).data.params
    assert params["mlflow_tracking_uri"] == "https://mlflow.example.com"
    assert not [value for value in params.values() if "hunter2" in value]


def test_names_mlflow_rejects_are_logged_under_names_it_accepts(tmp_path, caplog):
    config = {"lora": {"target modules (q, v)": "all"}, "k" * 300: 1, "lr": 0.1}
    callback = MLflowCallback(config=config)
    trainer = SimpleNamespace(model=None, device="cpu", output_dir=str(tmp_path / "out"))
    with caplog.at_level(logging.WARNING):
        callback.on_train_begin(trainer)
        for step in (1, 2):
            callback.on_step_end(trainer, step, {"loss": 1.0 / step, "acc@1": 0.5, "../x//y/": 2.0})
        callback.on_train_end(trainer)
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'out' / 'mlflow' / 'mlflow.db').resolve()}")
    mlflow_run = client.get_run(callback.run_id)
    assert mlflow_run.data.params == {"lora.target modules _q_ v_": "all", "k" * 250: "1", "lr": "0.1"}
    assert steps_of(client, callback.run_id, "loss") == [(1, 1.0), (2, 0.5)]
    assert steps_of(client, callback.run_id, "acc_1") == [(1, 0.5), (2, 0.5)]
    assert steps_of(client, callback.run_id, "x/y") == [(1, 2.0), (2, 2.0)]
    assert caplog.text.count("MLflow does not accept the name 'acc@1': logged as 'acc_1'") == 1
    assert "MLflow logging is off" not in caplog.text


def test_a_hand_written_loop_logs_each_epoch_at_its_last_step(tmp_path):
    callback = MLflowCallback()
    trainer = SimpleNamespace(model=None, device="cpu", output_dir=str(tmp_path / "out"))  # keeps no global_step
    callback.on_train_begin(trainer)
    for epoch in range(2):
        for step in range(epoch * 3 + 1, epoch * 3 + 4):
            callback.on_step_end(trainer, step, {"loss": 1.0})
        callback.on_epoch_end(trainer, epoch, {"loss": 0.5 - epoch / 10})
    callback.on_train_end(trainer)
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'out' / 'mlflow' / 'mlflow.db').resolve()}")
    assert steps_of(client, callback.run_id, "epoch/loss") == [(3, 0.5), (6, 0.4)]


def test_resuming_with_an_unreachable_server_warns_once_and_keeps_the_run_id(tmp_path, caplog):
    callback = MLflowCallback(tracking_uri=f"http://127.0.0.1:{closed_port()}")
    callback.load_state_dict({"run_id": "0123456789abcdef0123456789abcdef"})
    trainer = SimpleNamespace(model=None, device="cpu", output_dir=str(tmp_path / "out"), global_step=3)
    with caplog.at_level(logging.WARNING):
        callback.on_train_begin(trainer)
        callback.on_step_end(trainer, 4, {"loss": 1.0})
        callback.on_train_end(trainer)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "MLflow logging is off" in warning and "not in this tracking store" not in warning
    assert callback.state_dict() == {"run_id": "0123456789abcdef0123456789abcdef"}  # the next resume continues it


def test_a_deleted_experiment_is_named_in_one_warning_that_says_what_to_do(tmp_path, caplog):
    trainer = SimpleNamespace(model=None, device="cpu", output_dir=str(tmp_path / "out"))
    first = MLflowCallback(experiment="cleaned-up")
    first.on_train_begin(trainer)
    first.on_train_end(trainer)
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'out' / 'mlflow' / 'mlflow.db').resolve()}")
    experiment_id = client.get_experiment_by_name("cleaned-up").experiment_id
    client.delete_experiment(experiment_id)
    with caplog.at_level(logging.WARNING):
        MLflowCallback(experiment="cleaned-up").on_train_begin(trainer)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "the experiment 'cleaned-up' was deleted" in warning
    assert f"mlflow experiments restore --experiment-id {experiment_id}" in warning and "mlflow_experiment" in warning


def test_values_that_are_no_float_are_skipped_and_training_goes_on(tmp_path):
    callback = MLflowCallback()
    trainer = SimpleNamespace(model=None, device="cpu", output_dir=str(tmp_path / "out"))
    callback.on_train_begin(trainer)
    values = {"loss": float("nan"), "huge": 10**400, "pair": torch.ones(2), "one": torch.tensor([[0.5]]), "x": None}
    callback.on_step_end(trainer, 1, values)  # an int beyond a float raised OverflowError out of the step
    callback.on_train_end(trainer)
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'out' / 'mlflow' / 'mlflow.db').resolve()}")
    metrics = client.get_run(callback.run_id).data.metrics
    assert set(metrics) == {"loss", "one"} and math.isnan(metrics["loss"]) and metrics["one"] == 0.5


def test_a_run_the_user_opened_gets_the_metrics_and_stays_open(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{(tmp_path / 'user.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    trainer = SimpleNamespace(model=None, device="cpu", output_dir=str(tmp_path / "out"))
    with mlflow.start_run() as opened:
        mlflow.log_param("lr", "0.1")
        callback = MLflowCallback(config={"lr": 0.2, "lora_r": 4})
        callback.on_train_begin(trainer)
        callback.on_step_end(trainer, 1, {"loss": 2.0})
        callback.on_train_end(trainer)
        assert callback.run_id == opened.info.run_id
        client = MlflowClient(tracking_uri=uri)
        assert client.get_run(opened.info.run_id).info.status == "RUNNING"  # the user ends it
    mlflow_run = client.get_run(opened.info.run_id)
    assert mlflow_run.info.status == "FINISHED" and steps_of(client, opened.info.run_id, "loss") == [(1, 2.0)]
    assert mlflow_run.data.params == {"lr": "0.1", "lora_r": "4"}  # MLflow params cannot change: the user's stays
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 1


def test_mlflow_run_id_names_the_run_a_new_training_logs_to(tmp_path, monkeypatch):
    trainer = SimpleNamespace(model=None, device="cpu", output_dir=str(tmp_path / "out"))
    first = MLflowCallback()
    first.on_train_begin(trainer)
    first.on_step_end(trainer, 1, {"loss": 2.0})
    first.on_train_end(trainer)
    monkeypatch.setenv("MLFLOW_RUN_ID", first.run_id)
    second = MLflowCallback()
    second.on_train_begin(trainer)
    second.on_step_end(trainer, 1, {"loss": 3.0})  # the run has step 1: not logged twice
    second.on_step_end(trainer, 2, {"loss": 1.0})
    second.on_train_end(trainer)
    assert second.run_id == first.run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'out' / 'mlflow' / 'mlflow.db').resolve()}")
    assert steps_of(client, first.run_id, "loss") == [(1, 2.0), (2, 1.0)]


@pytest.mark.parametrize("folder", ["run?lr=1e-4", "run%41"])
def test_the_local_store_stays_in_a_run_folder_whose_name_has_url_characters(tmp_path, folder):
    out = tmp_path / folder
    callback = MLflowCallback()
    trainer = SimpleNamespace(model=None, device="cpu", output_dir=str(out))
    callback.on_train_begin(trainer)
    callback.on_step_end(trainer, 1, {"loss": 2.0})
    callback.on_train_end(trainer)
    assert [path.name for path in tmp_path.iterdir()] == [folder]  # no database file beside the run folder
    assert (out / "mlflow" / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{quote(str((out / 'mlflow' / 'mlflow.db').resolve()))}")
    assert steps_of(client, callback.run_id, "loss") == [(1, 2.0)]


def test_a_run_aborted_by_a_second_signal_is_killed_and_a_crash_failed(tmp_path):
    trainer = SimpleNamespace(model=None, device="cpu", output_dir=str(tmp_path / "out"))
    statuses = []
    for error in (KeyboardInterrupt("second SIGINT: aborting without saving"), RuntimeError("crash")):
        callback = MLflowCallback()
        callback.on_train_begin(trainer)
        callback.on_train_end(trainer, error=error)
        callback.on_train_end(trainer, error=None)  # a second call changes nothing
        statuses.append(local_store(SimpleNamespace(output_dir=trainer.output_dir)).get_run(callback.run_id).info.status)
    assert statuses == ["KILLED", "FAILED"]


def test_the_epoch_curve_is_the_fractional_epoch_of_each_step_once(tmp_path, tiny_model_dir):
    config = lora_config(tmp_path, tiny_model_dir, "e", max_steps=None, num_epochs=2, logging_steps=1,
                         eval_steps=100, save_steps=100, report_to=["mlflow"])
    run(config)
    client = local_store(config)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("llm-playground-sft").experiment_id])
    records = read_metrics(Path(config.output_dir) / "metrics.jsonl")
    epochs = [(r["step"], r["epoch"]) for r in records if r["type"] == "train"]
    logged = steps_of(client, mlflow_run.info.run_id, "epoch")
    assert [step for step, _ in logged] == [step for step, _ in epochs]  # each step once: not the epoch index too
    assert [value for _, value in logged] == pytest.approx([value for _, value in epochs])
    ends = [(r["step"], r["loss"]) for r in records if r["type"] == "epoch"]
    assert len(ends) == 2 and steps_of(client, mlflow_run.info.run_id, "epoch/loss") == [
        (step, pytest.approx(loss)) for step, loss in ends]


def test_a_copied_run_folder_never_logs_artifacts_into_the_original(tmp_path, caplog):
    import shutil

    original, copy = tmp_path / "run1", tmp_path / "run2"
    first = MLflowCallback()
    trainer = SimpleNamespace(model=None, device="cpu", output_dir=str(original))
    first.on_train_begin(trainer)
    (original / "training_summary.json").write_text("{}")
    first.on_train_end(trainer)
    before = sorted(path for path in (original / "mlflow").rglob("*") if "artifacts" in path.parts)
    shutil.copytree(original, copy)
    trainer = SimpleNamespace(model=None, device="cpu", output_dir=str(copy), global_step=1)
    for state in ({}, first.state_dict()):  # a new run, and the run of the copied checkpoint continued
        callback = MLflowCallback()
        callback.load_state_dict(state)
        with caplog.at_level(logging.WARNING):
            callback.on_train_begin(trainer)
            callback.on_step_end(trainer, 2, {"loss": 1.0})
            (copy / "training_summary.json").write_text("{}")
            callback.on_train_end(trainer)
        assert steps_of(local_store(SimpleNamespace(output_dir=str(copy))), callback.run_id, "loss") == [(2, 1.0)]
    assert sorted(path for path in (original / "mlflow").rglob("*") if "artifacts" in path.parts) == before
    assert caplog.text.count("was made in another run folder (copied or moved)") == 2


def test_one_callback_used_for_two_trainings_logs_two_runs(tmp_path):
    callback = MLflowCallback()  # a sweep in a hand-written loop: one callback, one training per learning rate
    trainer = SimpleNamespace(model=None, device="cpu", output_dir=str(tmp_path / "out"))
    run_ids = []
    for loss in (2.0, 3.0):
        callback.on_train_begin(trainer)
        callback.on_step_end(trainer, 1, {"loss": loss})
        callback.on_train_end(trainer)
        run_ids.append(callback.run_id)
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'out' / 'mlflow' / 'mlflow.db').resolve()}")
    assert run_ids[0] != run_ids[1]
    assert [steps_of(client, run_id, "loss") for run_id in run_ids] == [[(1, 2.0)], [(1, 3.0)]]


class _TrackingServer(BaseHTTPRequestHandler):
    """The few answers of MLflow's REST API a run needs (mlflow-skinny has no server to start)."""

    run = {"info": {"run_id": "0123456789abcdef0123456789abcdef", "experiment_id": "1", "run_name": "r",
                    "status": "RUNNING", "start_time": 1, "lifecycle_stage": "active",
                    "artifact_uri": "mlflow-artifacts:/1/0123456789abcdef0123456789abcdef/artifacts"}, "data": {}}

    def log_message(self, *args):
        pass

    def _answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if "experiments/get-by-name" in self.path:
            return self._answer(404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such experiment"})
        return self._answer(200, {"run": self.run})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        answers = {"experiments/create": {"experiment_id": "1"}, "runs/create": {"run": self.run},
                   "runs/update": {"run_info": self.run["info"]}}
        return self._answer(200, next((body for path, body in answers.items() if path in self.path), {}))


def test_a_password_in_a_server_uri_is_not_printed_with_the_run_link(tmp_path, capsys, caplog):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TrackingServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        callback = MLflowCallback(tracking_uri=f"http://bob:hunter2@127.0.0.1:{server.server_address[1]}")
        trainer = SimpleNamespace(model=None, device="cpu", output_dir=str(tmp_path / "out"))
        with caplog.at_level(logging.INFO):
            callback.on_train_begin(trainer)
            callback.on_step_end(trainer, 1, {"loss": 1.0})
            callback.on_train_end(trainer)
    finally:
        server.shutdown()
    assert callback.run_id == "0123456789abcdef0123456789abcdef" and "MLflow logging is off" not in caplog.text
    captured = capsys.readouterr()
    assert "hunter2" not in captured.out + captured.err + caplog.text


def test_log_model_in_a_hand_written_loop_logs_the_adapter_it_saved(tmp_path):
    from helpers import tiny_llama
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    out = tmp_path / "out"
    callback = MLflowCallback(log_model=True)
    trainer = SimpleNamespace(model=model, device="cpu", output_dir=str(out))
    callback.on_train_begin(trainer)
    callback.on_step_end(trainer, 1, {"loss": 1.0})
    model.save_pretrained(out)
    callback.on_train_end(trainer)
    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow' / 'mlflow.db').resolve()}")
    assert {a.path for a in client.list_artifacts(callback.run_id, "model")} >= {
        "model/adapter_model.safetensors", "model/adapter_config.json"}
