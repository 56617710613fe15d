"""On a CUDA GPU: our CUDA runs against our CPU runs, stop and resume, the variable-length attention kernel
against the per-example path, and a training step's loss without a host sync in this library's code.

Marked `gpu`: skipped without CUDA (CI has none); `bench/gpu.sh` runs them on the lent GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama

from app.sft import attention
from app.sft.attention import register_document_attention
from app.sft.data import PackedCollator
from app.sft.loss import causal_lm_loss_sum, label_positions

pytestmark = pytest.mark.gpu
WORKER = Path(__file__).with_name("_gpu_worker.py")
BACKEND = Path(__file__).resolve().parents[2]


def run_worker(out: Path, *, cpu: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BACKEND), os.environ.get("PYTHONPATH", "")])}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The worker's padded and packed runs (and their resumes) on the CPU and on CUDA, fp32."""
    on_cpu = run_worker(tmp_path_factory.mktemp("cpu"), cpu=True)
    on_cuda = run_worker(tmp_path_factory.mktemp("cuda"), cpu=False)
    assert (on_cpu["device"], on_cuda["device"]) == ("cpu", "cuda")
    return {"cpu": on_cpu, "cuda": on_cuda}


@pytest.mark.parametrize("collation", ["padded", "packed"])
def test_a_cuda_run_has_the_losses_of_the_cpu_run_in_fp32(runs, collation):
    on_cpu, on_cuda = runs["cpu"][collation]["losses"], runs["cuda"][collation]["losses"]
    assert len(on_cuda) == len(on_cpu) == 8
    for step, (gpu, cpu) in enumerate(zip(on_cuda, on_cpu, strict=True), start=1):
        assert gpu == pytest.approx(cpu, rel=2e-3), f"step {step}: cuda {gpu} vs cpu {cpu}"


@pytest.mark.parametrize("collation", ["padded", "packed"])
def test_stop_and_resume_on_cuda_gives_the_uninterrupted_losses(runs, collation):
    run = runs["cuda"][collation]
    assert run["resumed"] == pytest.approx(run["losses"][4:], rel=1e-5)


def packed_batch(device: str) -> dict:
    """Eight examples of different lengths in one packed row, with the trainer's host-computed positions."""
    generator = torch.Generator().manual_seed(0)
    examples = []
    for length in (37, 5, 120, 64, 9, 200, 1, 90):
        ids = torch.randint(4, 150, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    batch = PackedCollator()(examples)
    batch["label_positions"] = label_positions(batch["labels"])
    return {k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def packed_model() -> torch.nn.Module:
    model = tiny_llama(seed=0, vocab_size=160, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512).cuda().train()
    model.set_attn_implementation(register_document_attention())
    return model


def test_one_varlen_kernel_per_layer_matches_per_example_attention_in_bf16(monkeypatch):
    batch = packed_batch("cuda")
    calls = []
    kernel = attention._VARLEN_ATTN
    assert kernel is not None, f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"

    def counting(*args, **kwargs):
        calls.append(args[3])
        return kernel(*args, **kwargs)

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = packed_model()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = causal_lm_loss_sum(model, batch)
        loss.backward()
        return loss.detach().float(), [p.grad.float().flatten() for p in model.parameters()]

    monkeypatch.setattr(attention, "_VARLEN_ATTN", counting)
    varlen_loss, varlen_grads = loss_and_grads()
    assert len(calls) == 2  # one call per layer for the whole row
    monkeypatch.setattr(attention, "packed_kernel", lambda *args, **kwargs: "per_example")
    reference_loss, reference_grads = loss_and_grads()
    assert len(calls) == 2
    assert float(varlen_loss) == pytest.approx(float(reference_loss), rel=1e-2)
    for got, want in zip(varlen_grads, reference_grads, strict=True):
        assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.99


def test_a_packed_training_step_makes_no_host_sync_in_this_library():
    """`torch.cuda.set_sync_debug_mode` flags every op that waits for the GPU; none of them may be ours (the
    trainer reads the step's loss once, after the backward pass, by design)."""
    model = packed_model()
    batch = packed_batch("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        causal_lm_loss_sum(model, batch)[0].backward()  # first call: the output layer's check, allowed to sync
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, n_tokens = causal_lm_loss_sum(model, batch)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ours = [f"{Path(w.filename).name}:{w.lineno}" for w in caught
            if "synchroniz" in str(w.message) and f"app{os.sep}sft" in w.filename]
    assert ours == []
    assert int(n_tokens) == len(batch["label_positions"])
