#!/usr/bin/env bash
# Everything the lent GPU machine measures, in one call: the GPU tests, then every bench cell, one table.
#
#   bench/gpu.sh fetch        here, once: download into .whl/ the wheels the GPU machine needs to run the
#                             versions tested here (those installed in .venv; Python 3.12, x86-64 manylinux),
#                             transformers and its own required packages included
#   bench/gpu.sh [ARGS...]    on the GPU machine (carry .whl): install .whl/*.whl into /tmp/site, run the `gpu`
#                             tests, then gpu_compare.py ARGS (default: every cell of its PLAN, ~6.5 minutes);
#                             with $OUT set (the device tool), the log and results land there
#   PYTHON=.venv/bin/python bench/gpu.sh --cpu    the same script as a smoke run on a CPU (gpu tests skip)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# What the GPU image lacks or holds at other versions than the ones tested here.
WHEELS=(transformers huggingface-hub tokenizers safetensors kernels tomlkit httpx2 httpcore2 truststore hf-xet
        click regex typing-extensions accelerate peft datasets dill multiprocess fsspec xxhash pydantic
        pydantic-core annotated-types typing-inspection pyyaml)
EXTRA=(liger-kernel)  # not installed here (it needs Triton, which the GPU image has): its newest release

if [[ "${1:-}" == fetch ]]; then
    pins=$(.venv/bin/python -c 'import importlib.metadata as m, sys
print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' "${WHEELS[@]}")
    rm -rf .whl && mkdir -p .whl
    # shellcheck disable=SC2086  # one argument per pin
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $pins "${EXTRA[@]}"
    du -sh .whl && ls .whl
    exit 0
fi

export PYTHONPATH=backend
if [[ " $* " != *" --cpu "* ]] && compgen -G ".whl/*.whl" >/dev/null; then  # the wheels are for Python 3.12
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:backend
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 USE_HUB_KERNELS=0
OUT=${OUT:-$(mktemp -d)}
"$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())'

echo "== gpu tests"
timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider -c backend/pyproject.toml -o addopts="" \
    backend/tests/unit/test_gpu.py backend/tests/unit/test_attention.py \
    backend/tests/unit/test_trainer.py::test_per_step_loss_matches_transformers_trainer 2>&1 \
    | tail -25 | tee "$OUT/gpu_tests.txt" || true

echo "== bench"
"$PYTHON" bench/gpu_compare.py --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.txt"
