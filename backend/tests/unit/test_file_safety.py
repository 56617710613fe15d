"""Nothing outside the run, ever (issue 25): callbacks' folders inside a run, the best checkpoint as a path,
symlinks in a run folder, a linked or shared checkpoint folder, `sft merge --force`, leftovers and pointers."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import pytest
from test_cli import trained  # noqa: F401  (a module fixture: one finished `sft train` run)
from test_reliability import _trainer
from test_resume import lora_config, run

from app.sft import CheckpointCallback, SFTCallback, checkpointing
from app.sft.checkpointing import CheckpointError, list_checkpoints, resolve_checkpoint
from app.sft.cli import main
from app.sft.config import ConfigError
from app.sft.run_dir import LOCK_FILE


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """A finished LoRA run with checkpoints at steps 1, 2 and 3 and validation at step 2 (tests copy it)."""
    config = lora_config(tmp_path_factory.mktemp("finished"), tiny_model_dir, "run", max_steps=3, eval_steps=2)
    run(config)
    return config


def copy_run(config, destination: Path):
    shutil.copytree(config.output_dir, destination, symlinks=True)
    return config.model_copy(update={"output_dir": str(destination)})


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (to show nothing there changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- A.2 a callback's folder inside the run; A.3 the best checkpoint is a path ----------------------------------


def test_a_checkpoint_callback_folder_inside_the_run_is_ours(tmp_path, tiny_model_dir):
    config = lora_config(tmp_path, tiny_model_dir, "run", max_steps=2, eval_steps=1)
    saver = CheckpointCallback(output_dir=Path(config.output_dir) / "ck", save_steps=1, save_total_limit=None)
    assert (Path(config.output_dir) / "ck").is_dir()  # made when it is built, as the quick reference says
    trainer, _, result = run(config, callbacks=[saver])
    ck = Path(config.output_dir) / "ck"
    assert [p.name for p in list_checkpoints(ck)] == ["checkpoint_step_1", "checkpoint_step_2"]
    best = trainer.state.best_checkpoint
    assert best is not None and Path(best).is_dir() and Path(best).parent == ck  # a path one can open
    assert result["best_checkpoint"] == best and (Path(best) / "adapter_model.safetensors").is_file()
    saved = json.loads((ck / "checkpoint_step_2" / "trainer_state.json").read_text())["trainer"]
    assert saved["best_checkpoint"] == Path(best).name  # the checkpoint keeps a name: a copied run stays portable

    again = CheckpointCallback(output_dir=ck, save_steps=1, save_total_limit=None)
    resumed, _, result = run(config.model_copy(update={"max_steps": 3}), callbacks=[again], resume="latest")
    assert result["global_step"] == 3
    assert resumed.state.best_checkpoint is not None and Path(resumed.state.best_checkpoint).is_dir()


def test_the_default_best_checkpoint_is_a_path_also_after_a_resume(tmp_path, finished):
    config = copy_run(finished, tmp_path / "run")
    (Path(config.output_dir) / "training_summary.json").unlink()  # killed after its last checkpoint
    trainer, _, result = run(config, resume="latest")  # writes the outputs from the checkpoint
    root = Path(config.resolved_checkpoint_dir)
    best = trainer.state.best_checkpoint
    assert best == result["best_checkpoint"] and Path(best).parent == root and Path(best).is_dir()
    summary = json.loads((Path(config.output_dir) / "training_summary.json").read_text())
    assert summary["best_checkpoint"] == best


# --- B.5 symlinks in a run folder are never written through --------------------------------------------------


LINKED = ["config.yaml", "README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
          "tokenizer_config.json", "chat_template.jinja", "metrics.jsonl", "training_summary.json", "report.html",
          "loss.png", ".tmp-training_summary.json", "checkpoints/.tmp-latest", "checkpoints/latest"]


def test_links_in_a_run_folder_are_replaced_never_written_through(tmp_path, finished, caplog):
    config = copy_run(finished, tmp_path / "run")
    run_dir, outside = Path(config.output_dir), tmp_path / "outside"
    outside.mkdir()
    for name in LINKED:
        target = outside / name.replace("/", "_")
        source = run_dir / name
        if name == "checkpoints/latest":
            target.write_text("checkpoint_step_3\n")  # the pointer still names a checkpoint
        else:
            target.write_bytes(source.read_bytes() if source.is_file() else b"users file\n")
        source.unlink(missing_ok=True)
        source.symlink_to(target)
    before = tree(outside)
    with caplog.at_level(logging.WARNING):
        _, _, result = run(config.model_copy(update={"max_steps": 4}), resume="latest")
    assert result["global_step"] == 4
    assert tree(outside) == before  # not one byte written through a link
    for name in ("config.yaml", "README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                 "metrics.jsonl", "training_summary.json", "report.html", "checkpoints/latest"):
        assert (run_dir / name).is_file() and not (run_dir / name).is_symlink(), name
    assert json.loads((run_dir / "training_summary.json").read_text())["global_step"] == 4


def test_a_linked_run_lock_is_refused_and_its_target_untouched(tmp_path, finished):
    config = copy_run(finished, tmp_path / "run")
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (Path(config.output_dir) / LOCK_FILE).symlink_to(target)
    with pytest.raises(ConfigError, match=rf"output_dir: the run lock .*{LOCK_FILE} is a symbolic link"):
        run(config.model_copy(update={"max_steps": 4}), resume="latest")
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("name", ["generations", "tensorboard", "wandb", "mlflow"])
def test_a_linked_logger_folder_in_the_run_is_refused_and_its_target_untouched(tmp_path, finished, name):
    config = copy_run(finished, tmp_path / "run")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    shutil.rmtree(Path(config.output_dir) / name, ignore_errors=True)
    (Path(config.output_dir) / name).symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError, match=rf"output_dir: '.*/{name}' is a symbolic link to {outside}"):
        run(config.model_copy(update={"max_steps": 4}), resume="latest")
    assert tree(outside) == {"keep.txt": b"mine"}


def test_sft_eval_generate_refuses_a_linked_generations_folder(tmp_path, trained, capsys):  # noqa: F811
    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    shutil.copytree(trained[1], run_dir, symlinks=True)
    outside.mkdir()
    shutil.rmtree(run_dir / "generations", ignore_errors=True)
    (run_dir / "generations").symlink_to(outside, target_is_directory=True)
    assert main(["eval", str(run_dir), "--generate", "-n", "1"]) == 2
    assert "generations' is a symbolic link" in capsys.readouterr().err
    assert list(outside.iterdir()) == []


# --- B.6 a linked checkpoints/ folder; B.7 a shared checkpoint_dir is locked -----------------------------------


def test_a_linked_default_checkpoint_folder_is_refused(tmp_path, finished):
    config = copy_run(finished, tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    shutil.move(config.resolved_checkpoint_dir, elsewhere)
    Path(config.resolved_checkpoint_dir).symlink_to(elsewhere, target_is_directory=True)
    before = tree(elsewhere)
    for overwrite, resume in ((True, None), (False, "latest")):
        with pytest.raises(ConfigError, match=r"checkpoint_dir \(default\): .*checkpoints' is a symbolic link"):
            _trainer(config.model_copy(update={"save_total_limit": 1})).train(resume, overwrite=overwrite)
    assert tree(elsewhere) == before

    explicit = config.model_copy(update={"checkpoint_dir": str(elsewhere), "max_steps": 4, "save_total_limit": 2})
    _, _, result = run(explicit, resume="latest")  # named explicitly, it is the run's own (and gets a lock)
    assert result["global_step"] == 4
    names = [p.name for p in list_checkpoints(elsewhere)]
    assert names[-1] == "checkpoint_step_4" and "checkpoint_step_1" not in names


class _StartSecondRun(SFTCallback):
    """At step 1 of the first run, a second run with its own output_dir and the same checkpoint_dir."""

    def __init__(self, config) -> None:
        self.config, self.refusals = config, []

    def on_step_end(self, trainer, step, metrics, **kw):
        if step != 1:
            return
        for resume, overwrite in ((None, True), ("latest", False)):
            try:
                _trainer(self.config).train(resume, overwrite=overwrite)
            except ConfigError as error:
                self.refusals.append(str(error))


def test_a_shared_checkpoint_dir_is_locked_and_the_refusal_names_it(tmp_path, tiny_model_dir):
    shared = tmp_path / "shared_checkpoints"
    first = lora_config(tmp_path, tiny_model_dir, "first", max_steps=3, checkpoint_dir=str(shared))
    second = lora_config(tmp_path, tiny_model_dir, "second", max_steps=3, checkpoint_dir=str(shared))
    intruder = _StartSecondRun(second)
    _, _, result = run(first, callbacks=[intruder])
    assert result["global_step"] == 3
    assert len(intruder.refusals) == 2
    assert all(r.startswith(f"checkpoint_dir: {str(shared)!r} is in use by another training run")
               for r in intruder.refusals)
    assert [p.name for p in list_checkpoints(shared)] == [f"checkpoint_step_{s}" for s in (1, 2, 3)]
    assert not (shared / LOCK_FILE).exists() and not (Path(second.output_dir) / "metrics.jsonl").exists()


def test_a_run_naming_another_runs_default_checkpoint_folder_is_refused(tmp_path, tiny_model_dir):
    first = lora_config(tmp_path, tiny_model_dir, "first", max_steps=3)
    theirs = Path(first.resolved_checkpoint_dir)
    intruder = _StartSecondRun(lora_config(tmp_path, tiny_model_dir, "second", max_steps=3,
                                           checkpoint_dir=str(theirs)))
    _, _, result = run(first, callbacks=[intruder])
    assert result["global_step"] == 3
    assert len(intruder.refusals) == 2 and all(r.startswith("checkpoint_dir: ") for r in intruder.refusals)
    assert [p.name for p in list_checkpoints(theirs)] == [f"checkpoint_step_{s}" for s in (1, 2, 3)]


def test_a_refused_run_leaves_no_folder_it_made(tmp_path, tiny_model_dir):
    config = lora_config(tmp_path, tiny_model_dir, "run", max_steps=1)
    Path(config.output_dir).mkdir(parents=True)
    (Path(config.output_dir) / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no run of ours"):
        _trainer(config).train()
    assert [p.name for p in Path(config.output_dir).iterdir()] == ["notes.txt"]


# --- B.8 sft merge --force replaces only a merge of ours -------------------------------------------------------


def test_merge_force_replaces_only_a_merge_of_ours(trained, tiny_model_dir, tmp_path, capsys,  # noqa: F811
                                                   monkeypatch):
    _, run_dir = trained
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    targets = {"the run": run_dir, "the base model": base, "a user's folder": users}
    befores = {name: tree(folder) for name, folder in targets.items()}
    for folder in targets.values():
        assert main(["merge", str(run_dir), "--out", str(folder), "--force"]) == 2
        assert "not a merged model written by sft merge" in capsys.readouterr().err
    assert {name: tree(folder) for name, folder in targets.items()} == befores

    monkeypatch.chdir(users)
    assert main(["merge", str(run_dir), "--out", ".", "--force"]) == 2
    assert "--out: '.' is the current directory" in capsys.readouterr().err
    assert tree(users) == befores["a user's folder"]

    out = tmp_path / "merged"
    assert main(["merge", str(run_dir), "--out", str(out)]) == 0
    assert main(["merge", str(run_dir), "--out", str(out), "--force"]) == 0  # a merge of ours is replaced
    assert (out / "config.json").is_file()


# --- 14: pointers, leftovers, a full disk, a damaged trainer state --------------------------------------------


def test_a_latest_pointer_linked_to_a_file_is_refused_without_its_content(tmp_path, finished, caplog):
    config = copy_run(finished, tmp_path / "run")
    root = Path(config.resolved_checkpoint_dir)
    secret = tmp_path / "secret.txt"
    secret.write_text("TOKEN=hunter2-do-not-print\n")
    (root / "latest").unlink()
    (root / "latest").symlink_to(secret)
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(root, "latest") == root / "checkpoint_step_3"
    assert "is a symbolic link" in caplog.text and "hunter2" not in caplog.text


def test_leftovers_of_a_deletion_are_cleaned_and_a_planted_link_cannot_crash_rotation(tmp_path, finished):
    config = copy_run(finished, tmp_path / "run")
    root = Path(config.resolved_checkpoint_dir)
    shutil.copytree(root / "checkpoint_step_1", root / ".deleting-checkpoint_step_0")  # a killed deletion
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    (root / ".deleting-checkpoint_step_1").symlink_to(victim, target_is_directory=True)
    _, _, result = run(config.model_copy(update={"max_steps": 5, "save_total_limit": 2}), resume="latest")
    assert result["global_step"] == 5
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint_step_4", "checkpoint_step_5"]
    assert (victim / "keep.txt").read_text() == "keep"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]

    hand = CheckpointCallback(tmp_path / "hand", save_steps=1, save_total_limit=1)
    (tmp_path / "hand" / ".deleting-checkpoint_step_1").symlink_to(victim, target_is_directory=True)
    for step in (1, 2):
        Path(hand._get_checkpoint_path(step).removesuffix(".pt")).mkdir()
        hand.checkpoints.append(hand._get_checkpoint_path(step).removesuffix(".pt"))
    hand._rotate_checkpoints()  # renames checkpoint_step_1 onto the planted link's name: no crash
    assert hand.checkpoints == [str(tmp_path / "hand" / "checkpoint_step_2")]
    assert (victim / "keep.txt").read_text() == "keep"


def test_a_full_disk_before_the_first_checkpoint_does_not_promise_earlier_ones(tmp_path, tiny_model_dir,
                                                                                monkeypatch):
    config = lora_config(tmp_path, tiny_model_dir, "m", max_steps=2)

    def disk_full(directory, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing, "save_training_state", disk_full)
    with pytest.raises(CheckpointError) as failure:
        run(config)
    assert "no space left on device" in str(failure.value)
    assert "untouched" not in str(failure.value) and "no checkpoint was saved yet" in str(failure.value)


def test_a_damaged_trainer_state_in_the_newest_checkpoint_falls_back(tmp_path, finished, caplog):
    config = copy_run(finished, tmp_path / "run")
    root = Path(config.resolved_checkpoint_dir)
    (root / "checkpoint_step_3" / "trainer_state.json").write_text('{"trainer": {"global_step": ')
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(root, "latest") == root / "checkpoint_step_2"
    assert "checkpoint_step_3/trainer_state.json" in caplog.text
    _, _, result = run(config.model_copy(update={"max_steps": 4}), resume="latest")
    assert result["global_step"] == 4
