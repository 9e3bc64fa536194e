# dit_jax: `make demo` trains the CPU demo end to end; `make test` runs the test suite.
# Both create the virtual environment in .venv on first use.

# glibc's malloc backs XLA:CPU's per-step buffers with transparent huge pages instead of
# faulting them in 4 KiB at a time on every step: the CPU demo trains ~1.4x faster (README).
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test test-all parity stats clean

# Two install stages in one venv: the runtime (requirements.txt, all that `make demo`, `parity` and
# `stats` import; TensorFlow among it, since CLU's TensorBoard writers import it), then the test stack
# on top (requirements-test.txt, requirements-nodeps.txt: PyTorch, diffusers, papermill, ...) for `make test`.
$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt requirements-nodeps.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) -m dit_jax.main --config configs/default.py --workdir $(WORKDIR)

# The suite runs in TEST_WORKERS processes (pytest-xdist), a test file per process at a time (its
# module fixtures are built once); TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
TEST_FLAGS = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) --durations=15

test: $(VENV)/.installed-test
	$(PY) -m pytest -q $(TEST_FLAGS) tests

test-all: $(VENV)/.installed-test
	$(PY) -m pytest -q $(TEST_FLAGS) -m "" tests

parity: $(VENV)/.installed
	$(PY) -m dit_jax.parity tests/data/dit_official_tiny.npz

stats: $(VENV)/.installed
	$(PY) -m dit_jax.model_stats

clean:
	rm -rf $(VENV) runs .pytest_cache
