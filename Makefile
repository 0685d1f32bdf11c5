# shardlm: `make run` (demo) and `make test` (the whole suite) create .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CI and this machine install the CPU build of torch; users on GPUs get whatever
# torch their platform provides through pyproject's open range.
TORCH_PIN ?= torch==2.13.0
TP ?= 2

.PHONY: install run test gpu-check clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]" "$(TORCH_PIN)"
	touch $@

install: $(VENV)/.installed

QUESTION ?= What is the capital of France? Answer in one sentence.

# fetch the default model (once), start a local Ray cluster, answer a chat question at tp=$(TP)
run: install
	$(VENV)/bin/shardlm fetch
	$(VENV)/bin/shardlm generate --tp $(TP) --chat "$(QUESTION)"

test: install
	$(PY) -m pytest -q --durations=40

# the CUDA path on this machine's GPUs, with the Python it has (no virtualenv, nothing
# downloaded: `make gpu-check PY=python3` on a GPU machine); without CUDA it says so and exits 0
gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m cluster.tools.gpu_check --out gpu-check.json

clean:
	rm -rf $(VENV) build *.egg-info
