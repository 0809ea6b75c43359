# Entry points: `make demo`, `make test`, `make docs`, `make bench` and `make compat`.
# Each builds or refreshes the local virtual environment .venv from the project's own
# files; nothing is installed by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: demo test test-fast format docs docs-serve gallery bench bench-quick compat venv \
	posteriors-venv clean

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
	$(MAKE) docs
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

format: $(STAMP)
	$(VENV)/bin/ruff format laplace tests examples benchmarks
	$(VENV)/bin/ruff check --fix laplace tests examples benchmarks

# the documentation site, strictly: any warning (a broken link, a docstring that does
# not parse, a page missing from the navigation) fails the build
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# every example at its default size, its figure written where docs/examples.md shows it
GALLERY := docs/assets/gallery
gallery: $(STAMP)
	mkdir -p $(GALLERY)
	for example in regression calibration bayesopt calibration_gp marglik_training \
			huggingface reward_modeling curvature transformer continual \
			lora_multiple_choice lora_reward_model; do \
		$(PY) examples/$${example}_example.py --out $(GALLERY)/$$example.png || exit 1; \
	done

# every benchmark, this library and laplace-torch 0.3 side by side (laplace-torch in
# .lt-venv, which this builds); writes benchmarks/REPORT.md, shown by the docs
bench: $(STAMP)
	$(PY) benchmarks/run_all.py --torch $(TORCH)

bench-quick: $(STAMP)
	$(PY) benchmarks/run_all.py --torch $(TORCH) --quick

# the differential harness: the same public calls on this library and on laplace-torch
# 0.3 (in .lt-venv, built here if missing, as make bench builds it); every difference
# not listed as accepted fails; writes tests/compat/REPORT.md
compat: $(STAMP)
	$(PY) -c "import sys; sys.path.insert(0, 'benchmarks'); import run_all; \
		python, note = run_all.build_lt_venv('$(TORCH)'); print(note); \
		sys.exit(python is None)"
	COMPAT=1 COMPAT_REPORT=tests/compat/REPORT.md $(PY) -m pytest -q -p no:cacheprovider tests/compat

# posteriors 0.1.3 in its own environment, for tests/test_streaming_vs_posteriors.py
# (which is skipped without it)
POSTERIORS_VENV := .posteriors-venv
POSTERIORS_STAMP := $(POSTERIORS_VENV)/.installed

posteriors-venv: $(POSTERIORS_STAMP)

$(POSTERIORS_STAMP):
	test -x $(POSTERIORS_VENV)/bin/python || $(PYTHON) -m venv $(POSTERIORS_VENV)
	echo $(TORCH) > $(POSTERIORS_VENV)/constraints.txt
	$(POSTERIORS_VENV)/bin/python -m pip install --disable-pip-version-check -q \
		-c $(POSTERIORS_VENV)/constraints.txt $(TORCH) posteriors==0.1.3
	touch $@

clean:
	rm -rf $(VENV) site
