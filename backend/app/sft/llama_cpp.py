"""Greedy answers from a GGUF file in a real llama.cpp runtime, to check an export where users will run it.

    runtime = find_runtime()              # None when no llama.cpp runtime is installed
    answers = llama_cpp_answers(runtime, "outputs/demo/model.gguf", [prompt_text], max_new_tokens=64)

The runtime is the `node-llama-cpp` npm package (it ships prebuilt llama.cpp binaries; install it with
`NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install node-llama-cpp@3` in any folder, and point `SFT_NODE_LLAMA_CPP` at
that folder unless it is the current folder or above it), run by `node`, or llama.cpp's own `llama-cli` on PATH.
Each prompt is the full prompt text (chat markup included, as `Generator.prompt_text` renders it); llama.cpp
tokenizes it (special tokens parsed), decodes greedily and stops at an end-of-generation token, one of
`stop_ids`, or `max_new_tokens`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

NODE_PACKAGE_ENV = "SFT_NODE_LLAMA_CPP"
"""A folder holding `node_modules/node-llama-cpp` (or the package folder itself)."""

_NODE_RUNNER = r"""
import { pathToFileURL } from "node:url";
import { readFileSync } from "node:fs";
const job = JSON.parse(readFileSync(0, "utf8"));
const { getLlama, LlamaLogLevel } = await import(pathToFileURL(job.package).href);
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath: job.model });
const context = await model.createContext({ contextSize: job.context_size, sequences: 1, threads: job.threads });
const sequence = context.getSequence();
const stops = new Set(job.stop_ids);
for (const prompt of job.prompts) {
  await sequence.clearHistory();
  const ids = model.tokenize(prompt, true);
  const tokens = [];
  let stopped = false;
  if (job.max_new_tokens > 0) {
    for await (const token of sequence.evaluate(ids, { temperature: 0 })) {
      if (model.isEogToken(token) || stops.has(token)) { stopped = true; break; }
      tokens.push(token);
      if (tokens.length >= job.max_new_tokens) break;
    }
  }
  const text = model.detokenize(tokens, false);
  process.stdout.write(JSON.stringify({ prompt_ids: ids, ids: tokens, text, stopped }) + "\n");
}
await context.dispose();
await model.dispose();
await llama.dispose();
"""


@dataclass(frozen=True)
class Runtime:
    """An installed llama.cpp runtime: `kind` is `node-llama-cpp` (`path`: its package entry point) or
    `llama-cli` (`path`: the program)."""

    kind: str
    path: Path


@dataclass(frozen=True)
class LlamaCppAnswer:
    """One greedy answer in llama.cpp: its text (whitespace stripped), the prompt's tokens as llama.cpp read them
    (None from `llama-cli`, which does not print them) and whether it ended before the token limit."""

    text: str
    prompt_ids: list[int] | None
    stopped: bool | None


def find_runtime() -> Runtime | None:
    """The llama.cpp runtime installed here, if any: `node-llama-cpp` (in `$SFT_NODE_LLAMA_CPP`, or the
    `node_modules` of the current folder or one above it, with `node` on PATH), else `llama-cli` on PATH."""
    node = shutil.which("node")
    if node is not None:
        places = [Path(os.environ[NODE_PACKAGE_ENV]).expanduser()] if os.environ.get(NODE_PACKAGE_ENV) else []
        places += [folder for folder in (Path.cwd(), *Path.cwd().parents)]
        for place in places:
            for package in (place, place / "node_modules" / "node-llama-cpp"):
                entry = package / "dist" / "index.js"
                if package.name == "node-llama-cpp" and entry.is_file():
                    return Runtime("node-llama-cpp", entry)
    cli = shutil.which("llama-cli")
    return Runtime("llama-cli", Path(cli)) if cli else None


def llama_cpp_answers(
    runtime: Runtime, model: str | os.PathLike[str], prompts: Sequence[str], *, max_new_tokens: int,
    stop_ids: Sequence[int] = (), context_size: int = 2048, timeout_s: float = 600,
) -> list[LlamaCppAnswer]:
    """Greedy answers of the GGUF file `model` to each prompt text, in llama.cpp (on the CPU). A runtime that
    fails raises `RuntimeError` with its error output."""
    if runtime.kind == "node-llama-cpp":
        job = {"package": str(runtime.path), "model": str(Path(model).resolve()), "prompts": list(prompts),
               "max_new_tokens": max_new_tokens, "stop_ids": list(stop_ids), "context_size": context_size,
               "threads": min(os.cpu_count() or 1, 8)}
        with tempfile.TemporaryDirectory() as folder:  # a file, not `node -e`: the package forks node to test
            script = Path(folder) / "answer.mjs"       # its binary, and a child would inherit `-e`
            script.write_text(_NODE_RUNNER, encoding="utf-8")
            result = subprocess.run([shutil.which("node") or "node", str(script)], input=json.dumps(job),
                                    capture_output=True, text=True, timeout=timeout_s, check=False)
        _check(result, runtime)
        rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        return [LlamaCppAnswer(row["text"].strip(), row["prompt_ids"], row["stopped"]) for row in rows]
    answers = []
    for prompt in prompts:  # llama-cli: one process per prompt, the prompt not echoed, greedy
        result = subprocess.run(
            [str(runtime.path), "-m", str(model), "-p", prompt, "-n", str(max_new_tokens), "--temp", "0",
             "-c", str(context_size), "-no-cnv", "--no-display-prompt", "--no-warmup", "-ngl", "0"],
            capture_output=True, text=True, timeout=timeout_s, check=False, stdin=subprocess.DEVNULL,
        )
        _check(result, runtime)
        answers.append(LlamaCppAnswer(result.stdout.strip(), None, None))
    return answers


def _check(result: subprocess.CompletedProcess, runtime: Runtime) -> None:
    if result.returncode != 0:
        raise RuntimeError(f"llama.cpp ({runtime.kind} {runtime.path}) failed with exit code {result.returncode}: "
                           f"{result.stderr.strip()[-2000:]}")
