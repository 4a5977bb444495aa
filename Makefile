# The two commands of the README's quick start:
#   make demo   set up a virtual environment and run the end-to-end job on a local cluster
#   make test   set up a virtual environment and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[all]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -ra tests

test-fast: $(STAMP)
	$(PY) -m pytest -ra -m "not slow" tests

bench: $(STAMP)
	for b in training data predict parameter_server serving; do $(PY) benchmarks/bench_$$b.py || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info demo-output
