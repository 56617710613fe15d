#!/usr/bin/env bash
# GPU side-by-side benchmark (bench/gpu_compare.py), run from anywhere in the repository.
#
#   bench/gpu.sh fetch        here, once: download into .whl/ the pure wheels the GPU machine lacks (the
#                             versions installed in .venv; Python 3.12, x86-64 manylinux)
#   bench/gpu.sh [ARGS...]    on the GPU machine (carry .whl): install .whl/*.whl into /tmp/site, then run
#                             gpu_compare.py ARGS (default: every shape and contender, under 8 minutes)
#   PYTHON=.venv/bin/python bench/gpu.sh --cpu    tiny smoke run of the same code on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(pydantic pydantic-core annotated-types typing-inspection typing-extensions datasets dill multiprocess)

if [[ "${1:-}" == fetch ]]; then
    pins=$(.venv/bin/python -c 'import importlib.metadata as m, sys
print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' "${WHEELS[@]}")
    # shellcheck disable=SC2086  # one argument per pin
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $pins
    ls .whl
    exit 0
fi

export PYTHONPATH=backend
if [[ " $* " != *" --cpu "* ]] && compgen -G ".whl/*.whl" >/dev/null; then  # the wheels are for Python 3.12
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:backend
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu_compare.py "$@"
