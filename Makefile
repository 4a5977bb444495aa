# The two commands of the README's quick start:
#   make demo   set up a virtual environment and run the end-to-end job on a local cluster
#   make test   set up a virtual environment and run the test suite
# and for the figures in docs/benchmarks.md and the README:
#   make bench       run every benchmark at full size (on a quiet machine); writes benchmarks/results/*.json
#   make bench-docs  regenerate the docs' figures from benchmarks/results/*.json
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench bench-docs venv clean

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

BENCHMARKS ?= training data predict parameter_server serving wide
BENCH_ARGS ?=

# every benchmark runs, one after the other, even when one fails (its results file says
# which side failed); the target fails at the end if any did
bench: $(STAMP)
	@failed=""; for b in $(BENCHMARKS); do \
	  echo "== benchmarks/bench_$$b.py $(BENCH_ARGS)"; \
	  $(PY) benchmarks/bench_$$b.py $(BENCH_ARGS) || failed="$$failed $$b"; \
	done; \
	if [ -n "$$failed" ]; then echo "benchmarks that failed:$$failed"; exit 1; fi

# the generator needs only the standard library: no virtual environment required
bench-docs:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) benchmarks/make_docs.py

clean:
	rm -rf $(VENV) build *.egg-info demo-output
