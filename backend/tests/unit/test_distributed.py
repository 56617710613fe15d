"""Two processes on CPU over gloo, launched with torchrun, with DDP and with FSDP2: the same losses as one process
with the whole batch, one writer for checkpoints and logs, stops agreed on by all, exact resume.

Each strategy is one launch of `_distributed_worker.py`, which runs every scenario and leaves its results in a
folder; the tests read them. The one-process reference runs here, in the test process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _distributed_worker import (
    EARLY_STOP_AT,
    LORA,
    ONE_PROCESS_RUNS,
    RESUME_FROM,
    SIGNAL_AT,
    STEPS,
    TINY_BATCH,
    Probe,
    StopOnOneProcess,
    run,
    scenario_config,
)
from helpers import tiny_llama
from safetensors.torch import load_file

from app.sft.checkpointing import CheckpointError
from app.sft.metrics_log import read_metrics

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_distributed_worker.py")
PROCESSES = 2
LAUNCH_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory, tiny_model_dir) -> tuple[Path, dict]:
    """(folder, what its `full` run saw) of the one-process runs: `full` with the whole batch (2 × the
    per-process batch of two processes), `stopped` (the same, stopped by SIGTERM at SIGNAL_AT) and `tiny_batch`
    (one example per step, stopped at SIGNAL_AT)."""
    folder = tmp_path_factory.mktemp("single")
    config = scenario_config(folder, tiny_model_dir, "auto", "full", num_processes=1)
    probe = Probe(config.save_steps)
    run(config, [probe])
    sigterm = StopOnOneProcess(SIGNAL_AT, rank=0, signum=signal.SIGTERM)
    run(scenario_config(folder, tiny_model_dir, "auto", "stopped", num_processes=1), [sigterm])
    run(scenario_config(folder, tiny_model_dir, "auto", "tiny_batch", num_processes=1, **TINY_BATCH), [sigterm])
    return folder, probe.seen


@pytest.fixture(scope="module")
def single_process(one_process_runs) -> dict:
    """What one process with the whole batch sees in the `full` scenario."""
    return one_process_runs[1]


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def launched(request, tmp_path_factory, tiny_model_dir, one_process_runs) -> tuple[str, Path]:
    """(strategy, folder) of one 2-process launch of the worker's scenarios."""
    strategy = request.param
    out = tmp_path_factory.mktemp(f"launch_{strategy}")
    single = one_process_runs[0]
    for name in ONE_PROCESS_RUNS:  # each resumed in its own copy
        shutil.copytree(single / ("tiny_batch" if "tiny" in name else "stopped"), out / name)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(PROCESSES),
               str(WORKER), strategy, str(tiny_model_dir), str(out)]
    # A session of its own, so a hung launch is ended with every worker it started.
    with subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True) as launch:
        try:
            output, _ = launch.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(launch.pid, signal.SIGKILL)
            output, _ = launch.communicate()
            pytest.fail(f"torchrun did not finish in {LAUNCH_TIMEOUT_S} s:\n{output[-6000:]}")
    assert launch.returncode == 0, f"torchrun failed:\n{output[-8000:]}"
    return strategy, out


def seen(out: Path, scenario: str) -> list[dict]:
    """What each process recorded in `scenario`, by process index."""
    return [json.loads((out / f"{scenario}.rank{rank}.json").read_text()) for rank in range(PROCESSES)]


def losses(record: dict, key: str = "loss") -> list:
    return [step[key] for step in record["steps"]]


def test_each_process_knows_its_place_and_runs_the_chosen_strategy(launched):
    strategy, out = launched
    ranks = seen(out, "full")
    assert [(r["process_index"], r["num_processes"], r["is_main_process"]) for r in ranks] == [(0, 2, True),
                                                                                              (1, 2, False)]
    for record in ranks:
        if strategy == "ddp":
            assert record["wrapper"] == "DistributedDataParallel" and not record["sharded"]
        else:
            assert record["wrapper"].startswith("FSDP") and record["sharded"]  # FSDP2 DTensor shards


def test_two_processes_see_the_single_process_batches_and_losses(launched, single_process):
    _, out = launched
    ranks = seen(out, "full")
    # Micro-batch i of process 0 and of process 1 together are micro-batch i of the single process, every epoch.
    for epoch, single_plan in enumerate(single_process["plans"]):
        together = [sorted(a + b) for a, b in zip(ranks[0]["plans"][epoch], ranks[1]["plans"][epoch], strict=True)]
        assert together == [sorted(batch) for batch in single_plan]
    assert len(single_process["plans"]) == 2  # the run crosses an epoch: the reshuffle is shared too
    for record in ranks:
        assert losses(record) == pytest.approx(losses(single_process), abs=1e-5)
        assert len(losses(record)) == STEPS


def test_validation_loss_equals_the_single_process_value(launched, single_process):
    _, out = launched
    expected = losses(single_process, "val_loss")
    assert sum(v is not None for v in expected) == 3
    for record in seen(out, "full"):
        got = losses(record, "val_loss")
        assert [v is None for v in got] == [v is None for v in expected]
        assert [v for v in got if v is not None] == pytest.approx([v for v in expected if v is not None], abs=1e-5)


def test_only_the_main_process_writes_checkpoints_and_logs(launched):
    strategy, out = launched
    run_dir = out / "full" / "out"
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "best", "checkpoint_step_2", "checkpoint_step_4", "checkpoint_step_6", "latest"]
    for folder in checkpoints.glob("checkpoint_step_*"):
        assert sorted(p.name for p in folder.glob("rng_state_*.json")) == ["rng_state_0.json", "rng_state_1.json"]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if r["type"] == "eval"] == [2, 3, 4, 6]  # eval_steps and epoch ends (3, 6)
    main, other = seen(out, "full")
    assert main["saves"] == other["saves"] == [2, 4, 6]  # every process took part in the save
    # Every process finds each checkpoint complete (and `latest` naming it) as soon as the save returns.
    assert main["checkpoints_complete"] == other["checkpoints_complete"] == [True, True, True]
    assert main["result"] == {**other["result"], "runtime_s": main["result"]["runtime_s"]}


def test_checkpoints_hold_full_weights_and_optimizer_state(launched):
    _, out = launched
    run_dir = out / "full" / "out"
    shapes = {name: tuple(t.shape) for name, t in tiny_llama().state_dict().items()}
    last = run_dir / "checkpoints" / f"checkpoint_step_{STEPS}"
    weights = load_file(last / "model.safetensors")
    assert {name: tuple(t.shape) for name, t in weights.items()} == shapes
    final = load_file(run_dir / "model.safetensors")
    assert all(torch.equal(final[name], weights[name]) for name in shapes)
    optimizer = torch.load(last / "optimizer.pt", weights_only=True)
    assert {name: tuple(s["exp_avg"].shape) for name, s in optimizer["state"].items()} == shapes


def test_a_stop_asked_on_one_process_stops_every_process_at_that_step(launched):
    _, out = launched
    for record in seen(out, "early_stop"):  # should_stop set on the last process only
        assert record["result"]["global_step"] == EARLY_STOP_AT
        assert record["result"]["stop_reason"] == "callback:StopOnOneProcess"  # the same reason everywhere
        assert [s["step"] for s in record["steps"]] == list(range(1, EARLY_STOP_AT + 1))
    checkpoints = out / "early_stop" / "out" / "checkpoints"
    saved = json.loads((checkpoints / f"checkpoint_step_{EARLY_STOP_AT}" / "trainer_state.json").read_text())
    assert saved["trainer"]["stop_reason"] == "callback:StopOnOneProcess"  # saved at that very step
    for record in seen(out, "lora_stopped"):  # SIGTERM delivered to process 0 only
        assert (record["result"]["global_step"], record["result"]["stop_reason"]) == (SIGNAL_AT, "signal")


def test_resume_after_a_stop_continues_exactly(launched):
    _, out = launched
    uninterrupted = seen(out, "lora")
    stopped, resumed = seen(out, "lora_stopped"), seen(out, "lora_resumed")
    for rank in range(PROCESSES):
        for key in ("loss", "val_loss"):
            assert losses(stopped[rank], key) + losses(resumed[rank], key) == losses(uninterrupted[rank], key)


def test_resume_of_full_fine_tuning_from_an_earlier_checkpoint_continues_exactly(launched):
    _, out = launched
    for full, resumed in zip(seen(out, "full"), seen(out, "full_resumed"), strict=True):
        assert resumed["steps"] == full["steps"][RESUME_FROM:]


def step_records(run_dir: Path) -> list[dict]:
    """The run's logged training steps and evaluations, without the timings."""
    timing = ("tokens_per_second", "step_time_s", "elapsed_s")
    return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(run_dir / "metrics.jsonl")
            if r["type"] in ("train", "eval")]


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    """The resumed run's log, best record and final weights are the uninterrupted run's (within 1e-5 relative)."""
    got, expected = step_records(resumed), step_records(uninterrupted)
    assert [(r["type"], r["step"]) for r in got] == [(r["type"], r["step"]) for r in expected]
    for record, reference in zip(got, expected, strict=True):
        assert record.keys() == reference.keys()
        for key, value in reference.items():
            assert record[key] == (pytest.approx(value, rel=1e-5, abs=1e-7) if isinstance(value, float) else value)
    summary = json.loads((resumed / "training_summary.json").read_text())
    reference = json.loads((uninterrupted / "training_summary.json").read_text())
    for key in ("global_step", "best_step", "stop_reason", "train_tokens", "epochs"):
        assert summary[key] == reference[key], key
    assert summary["best_metric"] == pytest.approx(reference["best_metric"], rel=1e-5)
    weights, expected_weights = load_file(resumed / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    assert weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_a_two_process_run_resumed_on_one_process_continues_as_if_uninterrupted(launched, tiny_model_dir,
                                                                                 tmp_path, caplog):
    strategy, out = launched
    shutil.copytree(out / "full_stopped", tmp_path / "run")
    config = scenario_config(tmp_path, tiny_model_dir, strategy, "run", num_processes=PROCESSES)  # the same config
    caplog.set_level("INFO", logger="app.sft")
    result = run(config, resume="latest")
    assert result["global_step"] == STEPS and result["stop_reason"] == "max_steps"
    assert_same_run(tmp_path / "run" / "out", out / "full" / "out")
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Resumed from"))
    assert f"at step {SIGNAL_AT} of {STEPS}" in summary and "processes: 2 then, 1 now" in summary
    assert "global batch 8 examples per step" in summary
    assert "gradient_accumulation_steps 2 -> 4" in summary  # the trainer's choice, said in one line
    assert "continues exactly" in summary  # no dropout in this model


@pytest.mark.parametrize("scenario", ["single_resumed", "single_resumed_same_config"])
def test_a_one_process_run_resumed_on_two_processes_continues_as_if_uninterrupted(launched, one_process_runs,
                                                                                  scenario):
    _, out = launched
    folder = {"single_resumed": "single_stopped", "single_resumed_same_config": "single_stopped_same_config"}
    for record in seen(out, scenario):
        assert record["num_processes"] == 2 and record["result"]["global_step"] == STEPS
        assert [s["step"] for s in record["steps"]] == list(range(SIGNAL_AT + 1, STEPS + 1))
    assert_same_run(out / folder[scenario] / "out", one_process_runs[0] / "full" / "out")


def test_a_launch_that_cannot_keep_the_global_batch_is_refused_naming_both_layouts(launched):
    _, out = launched
    for record in seen(out, "tiny_refused"):  # one example per step can't be shared by two processes
        message = record["result"]["error"]
        assert "1 process × batch_size 1 × gradient_accumulation_steps 1 = 1 examples per step" in message
        assert "2 processes × batch_size 1 × gradient_accumulation_steps 1 = 2 examples per step" in message
        assert "allow_global_batch_change: true" in message
        assert record["steps"] == []
    state = json.loads((out / "single_tiny_batch" / "out" / "checkpoints" / f"checkpoint_step_{SIGNAL_AT}"
                        / "trainer_state.json").read_text())
    assert state["trainer"]["global_step"] == SIGNAL_AT  # nothing saved was touched


def test_allow_global_batch_change_trains_on_with_the_launch_global_batch(launched):
    _, out = launched
    for record in seen(out, "tiny_allowed"):
        assert record["result"]["global_step"] == STEPS
        assert [s["step"] for s in record["steps"]] == list(range(SIGNAL_AT + 1, STEPS + 1))
    steps = [r for r in read_metrics(out / "single_tiny_allowed" / "out" / "metrics.jsonl") if r["type"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert {r["tokens"] > 0 for r in steps} == {True}
    saved = json.loads((out / "single_tiny_allowed" / "out" / "checkpoints" / f"checkpoint_step_{STEPS}"
                        / "trainer_state.json").read_text())
    assert saved["trainer"]["layout"]["units_per_step"] == 2  # two examples per step from the resume on


def test_resume_on_another_number_of_processes_with_a_config_changing_the_global_batch_is_refused(
        launched, tiny_model_dir, tmp_path):
    strategy, out = launched
    shutil.copytree(out / "lora", tmp_path / "lora")
    config = scenario_config(tmp_path, tiny_model_dir, strategy, "lora", num_processes=PROCESSES, **LORA)
    changed = config.model_copy(update={"batch_size": 3})
    with pytest.raises(CheckpointError) as error:
        run(changed, resume="latest")
    message = str(error.value)
    assert "2 processes × batch_size 2 × gradient_accumulation_steps 2 = 8 examples per step" in message
    assert "1 process × batch_size 3 × gradient_accumulation_steps 2 = 6 examples per step" in message
    assert "allow_global_batch_change" in message


def test_a_run_with_dropout_resumes_on_another_layout_and_says_it_is_not_bit_for_bit(launched, tiny_model_dir,
                                                                                     tmp_path, caplog):
    strategy, out = launched
    shutil.copytree(out / "lora_stopped", tmp_path / "lora")
    config = scenario_config(tmp_path, tiny_model_dir, strategy, "lora", num_processes=PROCESSES, **LORA)
    caplog.set_level("INFO", logger="app.sft")
    result = run(config, resume="latest")
    assert result["global_step"] == STEPS and result["stop_reason"] == "max_steps"
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Resumed from"))
    assert "lora_dropout" in summary and "continues correctly but not bit for bit" in summary
    records = [r for r in read_metrics(tmp_path / "lora" / "out" / "metrics.jsonl") if r["type"] == "train"]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
