# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench results clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build of torch first, so that the range in pyproject.toml installs nothing larger.
	$(BIN)/python -m pip install -q torch==2.13.0
	# The project with every extra: `dev` holds the test tools plus the `sklearn` and `bench` extras.
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python examples/toy_1d_regression.py
	$(BIN)/python examples/truncpinv_digits.py

# Both pytest runs always run (a failure in the first does not hide the doctests); the wheel test is left to .ci/run.
test: setup
	$(BIN)/python -m pytest tests benchmarks -m "not wheel" --benchmark-disable -q; suite=$$?; \
	$(BIN)/python -m pytest truncpinv sven --doctest-modules -q; doctests=$$?; \
	test $$suite -eq 0 && test $$doctests -eq 0

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

# Time and accuracy side by side: the JSON export turned into tables by benchmarks/report.py.
bench: setup
	mkdir -p .benchmarks
	$(BIN)/python -m pytest benchmarks --benchmark-only --benchmark-group-by=group -q \
		--benchmark-json=.benchmarks/bench.json
	$(BIN)/python benchmarks/report.py .benchmarks/bench.json --plot .benchmarks/errors.png

# docs/results.md: the goals run of sven-bench (about 45 minutes on 2 cores; see the script).
results: setup
	PATH=$(abspath $(BIN)):$$PATH bash benchmarks/results.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .benchmarks
