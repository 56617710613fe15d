"""Runs SFTTrainer scenarios in every process of a multi-process launch; `test_distributed.py` starts it with

    python -m torch.distributed.run --standalone --nproc_per_node 2 _distributed_worker.py STRATEGY MODEL_DIR OUT

and asserts on what it leaves in OUT: each scenario's run folder and, per process, `<scenario>.rank<i>.json`
with what the callbacks saw there. Several scenarios share one launch, as starting processes is the slow part.
OUT starts with copies of one-process runs (`ONE_PROCESS_RUNS`), which some scenarios resume on two.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from torch.distributed.tensor import DTensor

from app.sft import SFTCallback, SFTTrainer, checkpointing
from app.sft.checkpointing import CheckpointError

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]  # run as a script by torchrun

from helpers import build_tiny_tokenizer, tiny_llama  # noqa: E402
from test_trainer import instruction_rows, make_config  # noqa: E402

TRAIN_ROWS, EVAL_ROWS = 24, 5  # 5 validation rows in batches of 2: the shards are uneven, one is padded
STEPS = 6
RESUME_FROM = 4  # the `full` run is also resumed from its checkpoint of this step, in a new folder
EARLY_STOP_AT = 4  # a save step: the checkpoint written then must already record the stop
SIGNAL_AT = 3
ONE_PROCESS_RUNS = ("single_stopped", "single_stopped_same_config", "single_tiny_batch", "single_tiny_allowed")
"""Copies of one-process runs that the launch resumes: stopped by SIGTERM at SIGNAL_AT (twice, for two configs),
and with a global batch of one example, which two processes can't share (twice: refused, then allowed)."""
TINY_BATCH = dict(batch_size=1, gradient_accumulation_steps=1)


def scenario_config(out: Path, model_dir: str | Path, strategy: str, name: str, *, num_processes: int,
                    **overrides):
    """The runs compared across process counts: the global batch is 4 × 2 accumulated micro-batches."""
    settings = dict(
        batch_size=4 // num_processes,
        eval_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=STEPS,
        eval_steps=2,
        save_steps=2,
        save_total_limit=None,
        learning_rate=3e-3,
        warmup_ratio=0.2,
        max_grad_norm=1.0,
        distributed={"strategy": strategy},
    )
    settings.update(overrides)
    return make_config(out / name, Path(model_dir), **settings)


LORA = dict(use_lora=True, lora_r=4, lora_dropout=0.1)
"""LoRA with dropout: an exact resume then also needs every process's random state back."""


def run(config, callbacks=(), resume=None) -> dict:
    trainer = SFTTrainer(
        config,
        callbacks=list(callbacks),
        model=tiny_llama(seed=0),
        tokenizer=build_tiny_tokenizer(),
        train_dataset=instruction_rows(TRAIN_ROWS),
        eval_dataset=instruction_rows(EVAL_ROWS, seed=9),
    )
    return trainer.train(resume_from_checkpoint=resume)


class Probe(SFTCallback):
    """What one process sees: its place in the run, its batch plan per epoch, step metrics, saves, and each
    checkpoint right after it was saved."""

    order = 70  # after CheckpointCallback (60): a checkpoint of this step is already written

    def __init__(self, save_steps: int) -> None:
        self.save_steps = save_steps
        self.seen: dict = {"plans": [], "steps": [], "saves": [], "checkpoints_complete": []}

    def on_train_begin(self, trainer, **kw):
        self.seen.update(is_main_process=trainer.is_main_process, process_index=trainer.process_index,
                         num_processes=trainer.num_processes, wrapper=type(trainer.model).__name__,
                         sharded=any(isinstance(p, DTensor) for p in trainer.model.parameters()))

    def on_epoch_begin(self, trainer, epoch, **kw):
        self.seen["plans"].append(trainer._epoch_plan(epoch))  # this process's micro-batches (example indices)

    def on_step_end(self, trainer, step, metrics, **kw):
        self.seen["steps"].append({"step": step, "loss": metrics["loss"], "val_loss": metrics.get("val_loss")})

    def on_save(self, trainer, step, checkpoint_path, **kw):
        self.seen["saves"].append(step)
        folder = trainer.checkpoint_dir / f"checkpoint_step_{step}"
        latest = (trainer.checkpoint_dir / checkpointing.LATEST_POINTER).read_text().strip()
        self.seen["checkpoints_complete"].append(checkpointing.is_complete(folder) and latest == folder.name)


class StopOnOneProcess(SFTCallback):
    """Asks to stop at `step` on process `rank` only, as a callback looking at local data would."""

    def __init__(self, step: int, rank: int, signum: int | None = None) -> None:
        self.step, self.rank, self.signum = step, rank, signum

    def on_step_end(self, trainer, step, metrics, **kw):
        if step == self.step and trainer.process_index == self.rank:
            if self.signum is None:
                trainer.should_stop = True
            else:
                os.kill(os.getpid(), self.signum)  # a preemption notice reaching one process


def main() -> None:
    strategy, model_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])

    def record(name: str, probe: Probe, result: dict) -> None:
        (out / f"{name}.rank{rank}.json").write_text(json.dumps({**probe.seen, "result": result}))

    def scenario(name: str, callbacks=(), resume=None, folder: str | None = None, config_for: int = world,
                 **overrides) -> None:
        """Run `name` (in `folder`) with the config written for `config_for` processes."""
        config = scenario_config(out, model_dir, strategy, folder or name, num_processes=config_for, **overrides)
        probe = Probe(config.save_steps)
        try:
            result = run(config, [probe, *callbacks], resume=resume)
        except CheckpointError as error:
            result = {"error": str(error)}
        record(name, probe, result)

    scenario("full")
    scenario("full_resumed", resume=str(out / "full" / "out" / "checkpoints" / f"checkpoint_step_{RESUME_FROM}"))
    scenario("early_stop", [StopOnOneProcess(EARLY_STOP_AT, rank=world - 1)])
    scenario("lora", **LORA)
    scenario("lora_stopped", [StopOnOneProcess(SIGNAL_AT, rank=0, signum=signal.SIGTERM)], **LORA)
    scenario("lora_resumed", resume="latest", folder="lora_stopped", **LORA)
    scenario("full_stopped", [StopOnOneProcess(SIGNAL_AT, rank=0, signum=signal.SIGTERM)])
    # One-process runs continued on two: with the two-process config (batch_size 2: the trainer cuts each
    # micro-batch of 4 in two) and with the one-process config (the trainer halves the accumulation).
    scenario("single_resumed", resume="latest", folder="single_stopped")
    scenario("single_resumed_same_config", resume="latest", folder="single_stopped_same_config", config_for=1)
    scenario("tiny_refused", resume="latest", folder="single_tiny_batch", config_for=1, **TINY_BATCH)
    scenario("tiny_allowed", resume="latest", folder="single_tiny_allowed", config_for=1, **TINY_BATCH,
             allow_global_batch_change=True)


if __name__ == "__main__":
    main()
