"""One generation evaluation in every process of a launch; `test_generation_eval.py` starts it with

    python -m torch.distributed.run --standalone --nproc_per_node 2 _generation_eval_worker.py MODEL_DIR OUT

and compares what it leaves in OUT (`rank<i>.json`: the published metrics; `run/generations/step_0.jsonl`) with
the same evaluation in one process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]  # run as a script by torchrun

from helpers import build_tiny_tokenizer, tiny_llama  # noqa: E402
from test_trainer import instruction_rows, make_config  # noqa: E402

from app.sft import GenerationEvalCallback, SFTTrainer  # noqa: E402

EVAL_ROWS = 7  # in batches of 2: 4 batches, shared 2 + 2, the last one short


def chars(prediction: str, reference: str) -> float:
    """A score that differs from answer to answer, so a lost or doubled sample changes the mean."""
    return len(prediction) / 100


def evaluate(model_dir: Path, out: Path) -> dict[str, float]:
    """The generation metrics of the tiny random model on `EVAL_ROWS` prompts, as this process computes them."""
    config = make_config(out, model_dir, output_dir=str(out / "run"), batch_size=2)
    trainer = SFTTrainer(config, model=tiny_llama(seed=0), tokenizer=build_tiny_tokenizer(),
                         train_dataset=instruction_rows(8))
    callback = GenerationEvalCallback(instruction_rows(EVAL_ROWS, seed=3), metrics=["stopped", chars],
                                      max_new_tokens=6, batch_size=2)
    trainer.add_callback(callback)
    results = callback.evaluate(trainer, 0)
    return {key: value for key, value in results.items() if key not in ("gen_time_s", "gen_tokens_per_second")}


def main() -> None:
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    results = evaluate(model_dir, out)
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
