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

.PHONY: demo test test-fast browser bench bench-docs venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[all]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# the whole suite on TensorFlow (Keras's default here), then the tests that touch the
# backend seam again on JAX: data, training (averaging, parameter server, all-reduce,
# custom strategies), custom objects, bundles, prediction, serving, backends
JAX_TESTS ?= tests/test_io.py tests/test_preprocessing.py tests/training/test_averaging.py \
	tests/training/test_parameter_server.py tests/training/test_allreduce.py tests/training/test_strategy.py \
	tests/test_custom_objects.py tests/test_bundle.py tests/test_predict.py tests/test_serving.py \
	tests/test_wide_categoricals.py tests/test_backends.py tests/test_serving_fastpath.py

test: $(STAMP) browser
	KERAS_BACKEND=tensorflow $(PY) -m pytest -ra tests
	KERAS_BACKEND=jax $(PY) -m pytest -ra $(JAX_TESTS)

# headless Chromium for the dashboard's screenshot test (Debian's package; the test skips without it)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "chromium is not installed: the dashboard screenshot test will skip"

test-fast: $(STAMP)
	$(PY) -m pytest -ra -m "not slow" tests

BENCHMARKS ?= training data predict parameter_server serving wide backends groups search gossip
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
