"""Never lose a run, never touch a file that isn't ours (issue 12): the run lock and output_dir checks, contained
checkpoint pointers, verified checkpoint manifests, and one clear message for each user mistake or fault."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import build_tiny_tokenizer, tiny_llama, write_jsonl
from test_cli import write_config
from test_resume import lora_config, run
from test_trainer import instruction_rows

from app.sft import SFTCallback, SFTTrainer
from app.sft.checkpointing import CheckpointError, list_checkpoints, resolve_checkpoint
from app.sft.cli import main
from app.sft.config import ConfigError, SFTConfig
from app.sft.data import DataError, build_datasets, format_row, load_rows
from app.sft.modeling import package_file
from app.sft.run_dir import LOCK_FILE, RunLock, RunLockedError

BACKEND = Path(__file__).resolve().parents[2]


def _trainer(config, **kwargs) -> SFTTrainer:
    return SFTTrainer(config, model=tiny_llama(seed=0), tokenizer=build_tiny_tokenizer(),
                      train_dataset=instruction_rows(8), **kwargs)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """A finished LoRA run with checkpoints at steps 1, 2 and 3 (read-only: tests copy it)."""
    config = lora_config(tmp_path_factory.mktemp("finished"), tiny_model_dir, "run", max_steps=3)
    run(config)
    return config


def copy_run(config, destination: Path):
    """A copy of a run folder and its config pointing at the copy."""
    shutil.copytree(config.output_dir, destination, symlinks=True)
    return config.model_copy(update={"output_dir": str(destination)})


# --- item 3: one run per folder ------------------------------------------------------------------------------


def test_second_run_is_refused_while_another_process_holds_the_folder(tmp_path, tiny_model_dir):
    config = lora_config(tmp_path, tiny_model_dir, "busy", max_steps=2)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from app.sft.run_dir import RunLock; "
         f"lock = RunLock({config.output_dir!r}); lock.acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(BACKEND)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"in use by another training run: process {holder.pid} on host"):
            _trainer(config).train()
        assert not (Path(config.output_dir) / "metrics.jsonl").exists()  # the second run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed: its lock is stale now and the next run takes it over.
    _trainer(config).train()
    assert (Path(config.output_dir) / "training_summary.json").is_file()
    assert not (Path(config.output_dir) / LOCK_FILE).exists()  # released at the end


def test_lock_held_in_this_process_refuses_a_trainer(tmp_path, tiny_model_dir):
    config = lora_config(tmp_path, tiny_model_dir, "mine", max_steps=1)
    with RunLock(config.output_dir):
        with pytest.raises(RunLockedError, match=str(os.getpid())):
            _trainer(config).train()
    _trainer(config).train()  # released


class _Boom(SFTCallback):
    def on_step_end(self, trainer, step, metrics, **kw):
        raise RuntimeError("boom")


def test_lock_is_released_after_an_exception(tmp_path, tiny_model_dir):
    config = lora_config(tmp_path, tiny_model_dir, "boom", max_steps=2)
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(config, callbacks=[_Boom()]).train()
    assert not (Path(config.output_dir) / LOCK_FILE).exists()
    RunLock(config.output_dir).acquire()  # free


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, tiny_model_dir, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    config = lora_config(tmp_path, tiny_model_dir, "stale", max_steps=1)
    Path(config.output_dir).mkdir(parents=True)
    import socket

    (Path(config.output_dir) / LOCK_FILE).write_text(
        json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}))
    with caplog.at_level(logging.WARNING):
        _trainer(config).train()
    assert "stale run lock" in caplog.text and str(dead.pid) in caplog.text


def test_lock_written_on_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "node-17", "started": "2026-01-01T00:00"}))
    with pytest.raises(RunLockedError, match=r"process 1 on host node-17.*if that run is no longer running, delete"):
        RunLock(tmp_path).acquire()


def test_new_run_in_a_folder_holding_a_run_is_refused(tmp_path, finished_run):
    config = copy_run(finished_run, tmp_path / "again")
    before = (Path(config.output_dir) / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"already holds a run.*--resume.*new output_dir.*--overwrite"):
        _trainer(config).train()
    assert (Path(config.output_dir) / "metrics.jsonl").read_text() == before  # nothing replaced


def test_overwrite_deletes_only_the_runs_own_files(tmp_path, finished_run):
    config = copy_run(finished_run, tmp_path / "over")
    out = Path(config.output_dir)
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "my_checkpoint_notes.txt").write_text("mine too")
    (out / "merged").mkdir()
    (out / "merged" / "keep.bin").write_bytes(b"user data")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "precious.txt").write_text("x")
    os.symlink(outside, out / "checkpoints" / "checkpoint_step_99")  # named like ours, but a link: never followed
    _trainer(config.model_copy(update={"max_steps": 1, "save_steps": 1000})).train(overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "checkpoints" / "my_checkpoint_notes.txt").is_file()
    assert (out / "merged" / "keep.bin").is_file() and (outside / "precious.txt").is_file()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint_step_1"]  # the old 1-3 are gone
    assert {json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()} == {1}


def test_cli_refuses_a_second_new_run_and_overwrite_replaces_it(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir, max_steps=1, eval_steps=100, save_steps=100)
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "Traceback" not in err
    assert main(["train", str(config), "--overwrite"]) == 0
    assert main(["train", str(config), "--overwrite", "--resume"]) == 2  # contradictory


# --- item 5: output_dir is checked against the user's own files -----------------------------------------------


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("cwd", "is the current directory"),
        ("parent", "is a parent of the current directory"),
        ("model", "is the folder of base_model"),
        ("data", "is the folder of dataset_name"),
        ("foreign", "is not empty .*README.md.* and holds no run of ours"),
    ],
)
def test_output_dir_that_holds_the_users_files_is_refused(where, message, tmp_path, tiny_model_dir, monkeypatch):
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    (project / "README.md").write_text("my project")
    data = write_jsonl(tmp_path / "data" / "train.jsonl", instruction_rows(8))
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    monkeypatch.chdir({"cwd": project, "parent": project / "sub"}.get(where, tmp_path))
    output_dir = {"cwd": ".", "parent": "..", "model": str(model), "data": str(data.parent),
                  "foreign": str(project)}[where]
    config = lora_config(tmp_path, model, "x", max_steps=1, output_dir=output_dir, dataset_name=str(data))
    before = sorted(p.name for p in [*project.iterdir(), *model.iterdir(), *data.parent.iterdir()])
    with pytest.raises(ConfigError, match=f"output_dir: .*{message}"):
        SFTTrainer(config, model=tiny_llama(seed=0), tokenizer=build_tiny_tokenizer()).train()
    assert sorted(p.name for p in [*project.iterdir(), *model.iterdir(), *data.parent.iterdir()]) == before
    assert (project / "README.md").read_text() == "my project"


def test_checkpoint_dir_that_is_a_file_is_reported_as_checkpoint_dir(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "ckpt").write_text("a file")
    config = write_config(tmp_path, tiny_model_dir, max_steps=1, checkpoint_dir=str(tmp_path / "ckpt"))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint_dir: " in err and "is a file" in err and "output_dir" not in err


# --- item 9: pointers only lead to checkpoints of this folder --------------------------------------------------


@pytest.mark.parametrize(
    "pointer",
    [
        b"../../other_run/checkpoints/checkpoint_step_8\n",
        b"checkpoint_step_2/../../../other_run/checkpoints/checkpoint_step_8",
        "ABSOLUTE_OTHER",
        b"\xff\xfe\x00\x81binary garbage",
        b"",
        b"checkpoint_step_2\x00",
    ],
)
def test_a_latest_pointer_that_leaves_the_folder_falls_back_with_a_warning(pointer, tmp_path, finished_run,
                                                                             caplog):
    config = copy_run(finished_run, tmp_path / "run")
    other = tmp_path / "other_run" / "checkpoints"
    other.mkdir(parents=True)
    shutil.copytree(Path(config.resolved_checkpoint_dir) / "checkpoint_step_1", other / "checkpoint_step_8")
    if pointer == "ABSOLUTE_OTHER":
        pointer = str(other / "checkpoint_step_8").encode()
    root = Path(config.resolved_checkpoint_dir)
    (root / "latest").write_bytes(pointer)
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(root, "latest") == root / "checkpoint_step_3"
    assert str(root / "latest") in caplog.text


def test_a_symlinked_checkpoint_leading_elsewhere_is_never_resumed(tmp_path, finished_run, caplog):
    config = copy_run(finished_run, tmp_path / "run")
    root = Path(config.resolved_checkpoint_dir)
    elsewhere = tmp_path / "other_run" / "checkpoint_step_8"
    shutil.copytree(root / "checkpoint_step_1", elsewhere)
    os.symlink(elsewhere, root / "checkpoint_step_9")
    (root / "latest").write_text("checkpoint_step_9\n")
    assert "checkpoint_step_9" not in [p.name for p in list_checkpoints(root)]
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(root, True) == root / "checkpoint_step_3"
    assert "checkpoint_step_9" in caplog.text


def test_a_copied_run_resumes_from_its_own_checkpoints(tmp_path, finished_run):
    """An absolute pointer (written by older versions) into the original run is re-rooted into the copy."""
    config = copy_run(finished_run, tmp_path / "copy")
    original = Path(finished_run.resolved_checkpoint_dir)
    root = Path(config.resolved_checkpoint_dir)
    (root / "latest").write_text(str(original / "checkpoint_step_2") + "\n")
    assert resolve_checkpoint(root, "latest") == root / "checkpoint_step_2"
    assert (original / "latest").read_text() == "checkpoint_step_3\n"  # a pointer holds a folder name


def test_package_uri_cannot_leave_its_package():
    for uri in ("package://json/../../x", "package://json/../os.py", "package://json//etc/passwd"):
        with pytest.raises(ConfigError, match="leaves the package 'json'"):
            package_file(uri)
    assert package_file("package://json/decoder.py").is_file()


# --- item 10: checkpoint files are verified against their manifest ---------------------------------------------


def test_a_truncated_file_in_the_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, finished_run, caplog):
    config = copy_run(finished_run, tmp_path / "run")
    root = Path(config.resolved_checkpoint_dir)
    adapter = root / "checkpoint_step_3" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(root, "latest") == root / "checkpoint_step_2"
    assert "adapter_model.safetensors" in caplog.text and "checkpoint_step_2" in caplog.text
    with pytest.raises(CheckpointError, match=r"checkpoint_step_3/adapter_model.safetensors is corrupt"):
        run(config.model_copy(update={"max_steps": 4}), resume=str(root / "checkpoint_step_3"))


def test_a_damaged_byte_is_found_by_the_checksum(tmp_path, finished_run, caplog):
    config = copy_run(finished_run, tmp_path / "run")
    root = Path(config.resolved_checkpoint_dir)
    adapter = root / "checkpoint_step_3" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0x01  # same size, one bit of a weight flipped: the file still loads
    adapter.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(root, "latest") == root / "checkpoint_step_2"
    assert "adapter_model.safetensors is corrupt: its checksum differs" in caplog.text
    with pytest.raises(CheckpointError, match=r"checkpoint_step_3/adapter_model.safetensors is corrupt: its checksum"):
        run(config.model_copy(update={"max_steps": 4}), resume=str(root / "checkpoint_step_3"))


def test_every_file_of_a_checkpoint_is_in_its_manifest(finished_run):
    checkpoint = Path(finished_run.resolved_checkpoint_dir) / "checkpoint_step_3"
    manifest = json.loads((checkpoint / "manifest.json").read_text())["files"]
    on_disk = {p.name for p in checkpoint.iterdir()} - {"manifest.json", "trainer_state.json"}
    assert set(manifest) == on_disk and {"adapter_model.safetensors", "optimizer.pt"} <= on_disk
    assert all(entry["size"] == (checkpoint / name).stat().st_size for name, entry in manifest.items())


def test_a_checkpoint_without_manifest_still_resumes(tmp_path, finished_run):
    config = copy_run(finished_run, tmp_path / "old")
    for manifest in Path(config.resolved_checkpoint_dir).glob("*/manifest.json"):
        manifest.unlink()  # as written by an earlier version
    _, recorder, result = run(config.model_copy(update={"max_steps": 4}), resume="latest")
    assert result["global_step"] == 4 and [m["loss"] for m in recorder.step_metrics()]


# --- messages that name the file, the field and the cause -----------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB file system (tmpfs), when this process may mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("needs permission to mount a small tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


class _FillDiskAfter(SFTCallback):
    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_save(self, trainer, step, checkpoint_path, **kw):
        if step == self.step:
            with open(self.path, "wb") as f, __import__("contextlib").suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()


def test_a_full_disk_during_a_save_names_the_file_and_keeps_earlier_checkpoints(small_disk, tmp_path,
                                                                                  tiny_model_dir):
    config = lora_config(tmp_path, tiny_model_dir, "full", max_steps=3, output_dir=str(small_disk / "run"))
    with pytest.raises(CheckpointError, match=r"^no space left on device while writing .*checkpoint_step_3"):
        run(config, callbacks=[_FillDiskAfter(2, small_disk / "filler")])
    root = Path(config.resolved_checkpoint_dir)
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint_step_1", "checkpoint_step_2"]
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())


def test_report_is_written_atomically(small_disk, finished_run):
    from app.sft.report import ReportError, render_report

    run_dir = small_disk / "run"
    run_dir.mkdir()
    shutil.copy(Path(finished_run.output_dir) / "metrics.jsonl", run_dir)
    (run_dir / "report.html").write_text("previous report")
    _FillDiskAfter(1, small_disk / "filler").on_save(None, 1, "")
    with pytest.raises(ReportError, match=r"loss\.png: cannot write it \(No space left on device\)"):
        render_report(run_dir)
    assert (run_dir / "report.html").read_text() == "previous report"
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "report.html"]  # no temp files left


class _DamageMetricsLog(SFTCallback):
    def on_step_end(self, trainer, step, metrics, **kw):  # the last step: the report is rendered after it
        if step == 2:
            log = Path(trainer.output_dir) / "metrics.jsonl"
            log.write_text("{damaged\n" + log.read_text())


def test_a_failing_report_after_a_successful_training_is_a_warning(tmp_path, tiny_model_dir, caplog):
    config = lora_config(tmp_path, tiny_model_dir, "report", max_steps=2)
    with caplog.at_level(logging.WARNING):
        _, _, result = run(config, callbacks=[_DamageMetricsLog()])
    assert result["global_step"] == 2
    assert "No training report" in caplog.text and "metrics.jsonl:1" in caplog.text
    assert (Path(config.output_dir) / "training_summary.json").is_file()
    assert not (Path(config.output_dir) / "report.html").exists()


def test_a_wrong_typed_trainer_state_field_is_one_checkpoint_error(tmp_path, finished_run, capsys):
    config = copy_run(finished_run, tmp_path / "run")
    state_file = Path(config.resolved_checkpoint_dir) / "checkpoint_step_3" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["trainer"]["global_step"] = "three"
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"trainer_state.json: field 'global_step' must be int, got 'three'"):
        run(config.model_copy(update={"max_steps": 4}), resume=str(state_file.parent))  # "latest" falls back
    assert "Logging error" not in capsys.readouterr().err


@pytest.mark.parametrize("role", ["wizard", "assitant"])
def test_a_chat_row_with_an_unknown_role_names_it(role, tmp_path, tiny_tokenizer):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": role, "content": "hello"}]}
    path = write_jsonl(tmp_path / "data.jsonl", [good, good, bad])
    config = SFTConfig(base_model="x", dataset_name=str(path), dataset_format="chat", validation_split=0.0)
    with pytest.raises(DataError, match=rf"data.jsonl:3: messages\[1\]: unknown role '{role}'.*"
                                        r"accepted roles: system, user, assistant"):
        build_datasets(config, tiny_tokenizer)
    assert format_row({"messages": [{"role": "system", "content": "s"}]}, "chat")  # the accepted roles pass


def test_non_utf8_input_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:3: not UTF-8 text \(byte 0xe9 at column 14\)"):
        load_rows(str(path))


@pytest.fixture
def unreachable_hub(monkeypatch):
    """A Hugging Face Hub endpoint that refuses connections at once (a closed local port: no network used)."""
    import huggingface_hub.constants

    from app.sft import modeling

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    modeling.hub_unreachable.cache_clear()
    yield
    modeling.hub_unreachable.cache_clear()


def test_a_hub_id_without_network_fails_fast_with_one_warning(unreachable_hub, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"base_model": "some-org/some-model",
                                      "dataset_name": str(write_jsonl(tmp_path / "d.jsonl", instruction_rows(4)))}))
    started = time.monotonic()
    assert main(["validate", str(config)]) == 2
    assert main(["train", str(config)]) == 2
    assert time.monotonic() - started < 20  # one refused connection, no retries
    err = capsys.readouterr().err
    assert err.count("the Hugging Face Hub is unreachable and the model is not in the local cache") == 2
    assert err.count("is unreachable (") == 1 and "Traceback" not in err


def test_an_unreachable_wandb_server_logs_offline_after_a_short_timeout(tmp_path, monkeypatch, caplog):
    import wandb

    from app.sft.callbacks import WandBCallback

    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
        (tmp_path / name.lower()).mkdir()
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    wandb.teardown()
    callback = WandBCallback(project="p", init_timeout=2)
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING):
            callback.on_train_begin(SimpleNamespace(model=torch.nn.Linear(1, 1), device=torch.device("cpu")))
        assert time.monotonic() - started < 30
        assert callback.run is not None and callback.run.settings.mode == "offline"
        assert caplog.text.count("W&B unreachable") == 1 and "logging offline" in caplog.text
    finally:
        callback.on_train_end(None)
        wandb.teardown()


def test_resume_of_a_finished_run_prints_no_none(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir, max_steps=2, save_steps=2, eval_steps=100)
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert main(["train", str(config), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "(None)" not in out and "(max_steps)" in out


def test_early_stopping_without_validation_data_warns_at_start(tmp_path, tiny_model_dir, caplog):
    config = lora_config(tmp_path, tiny_model_dir, "patience", max_steps=1, early_stopping_patience=2)
    with caplog.at_level(logging.WARNING):
        _trainer(config).train()
    assert "early_stopping_patience is set but there is no validation data" in caplog.text


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("command", ["generate", "merge"])
def test_a_pickled_adapter_is_refused_by_name(command, tmp_path, finished_run, capsys):
    run_dir = Path(shutil.copytree(finished_run.output_dir, tmp_path / "run"))
    weights = run_dir / "adapter_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), run_dir / "adapter_model.bin")
    weights.unlink()
    argv = ["generate", str(run_dir), "--prompt", "hi"] if command == "generate" else ["merge", str(run_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{run_dir / 'adapter_model.bin'}: pickled weights are refused for safety" in err
    assert "Unpickling" not in err and "Traceback" not in err
