# Two entry points: `make demo` and `make test`. Both build or refresh the local
# virtual environment .venv from the project's own files; nothing is installed by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: demo test test-fast format bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt requirements/nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) --no-deps -r requirements/nodeps.txt
	$(PIP) -r requirements/lock.txt
	# editable_mode=compat: a plain path entry, so scripts run from any directory
	# import this checkout (the default import hook resolved laplace as a namespace)
	$(PIP) --no-deps --no-build-isolation -e . --config-settings editable_mode=compat \
		|| $(PIP) --no-deps -e . --config-settings editable_mode=compat
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/regression_example.py

test: $(STAMP)
	$(VENV)/bin/ruff check laplace tests examples benchmarks
	$(VENV)/bin/ruff format --check laplace tests examples benchmarks
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

format: $(STAMP)
	$(VENV)/bin/ruff format laplace tests examples benchmarks
	$(VENV)/bin/ruff check --fix laplace tests examples benchmarks

bench: $(STAMP)
	$(PY) benchmarks/curvature_benchmark.py
	$(PY) benchmarks/laplace_benchmark.py

clean:
	rm -rf $(VENV)
