"""How often an exported GGUF file answers the demo's held-out prompts exactly as the trained run does, per dtype,
and how large the file is: read back by transformers, and in llama.cpp when a runtime is installed (docs/export.md).

    .venv/bin/python examples/demo.py                         # trains outputs/demo first
    .venv/bin/python bench/export_agreement.py [outputs/demo] [--dtypes q8_0,q4_1] [-n 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))

from app.sft.data import format_row, load_rows
from app.sft.export import check_export, export_gguf
from app.sft.generation import Generator
from app.sft.llama_cpp import find_runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", default="outputs/demo")
    parser.add_argument("--dtypes", default="q8_0,q4_1")
    parser.add_argument("-n", "--num-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    trained = Generator.load(args.run)
    rows = load_rows(trained.config.eval_dataset_name)
    prompts = [[format_row(row, "alpaca")[0]] for row in rows.select(range(min(args.num_prompts, len(rows))))]
    runtime = find_runtime()
    print(f"run {args.run}, {len(prompts)} held-out prompts, {args.max_new_tokens} tokens, llama.cpp: "
          f"{runtime.kind if runtime else 'not installed'}")
    print("| dtype | file size | same answer, read by transformers | same answer, in llama.cpp | prompts that differ |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            path = export_gguf(args.run, Path(tmp) / f"{dtype}.gguf", dtype=dtype, force=True)
            checks = check_export(path, trained, prompts, max_new_tokens=args.max_new_tokens, runtime=runtime)
            native = sum(bool(check.llama_cpp_agrees) for check in checks) if runtime else None
            differ = [f"{i + 1}{'' if c.agrees else 't'}{'' if c.llama_cpp_agrees in (None, True) else 'l'}"
                      for i, c in enumerate(checks) if not c.agrees or c.llama_cpp_agrees is False]
            print(f"| {dtype} | {path.stat().st_size / 1e6:.0f} MB | {sum(c.agrees for c in checks)}/{len(checks)} | "
                  f"{'n/a' if native is None else f'{native}/{len(checks)}'} | {', '.join(differ) or '-'} |",
                  flush=True)
            for i, check in enumerate(checks):
                if not check.agrees or check.llama_cpp_agrees is False:
                    print(f"    {i + 1}: trained {check.trained!r}\n       file    {check.exported!r}\n"
                          f"       llama.cpp {check.llama_cpp!r} (same prompt tokens: "
                          f"{check.llama_cpp_same_prompt_tokens})")
    print("(prompts that differ: number, t = read by transformers, l = in llama.cpp)")


if __name__ == "__main__":
    main()
