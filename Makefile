# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
# On the standard package index `torch==2.13.0` is the CUDA build (several GB with cuDNN and NCCL); PyTorch's CPU
# wheel index has the CPU build (about 200 MB). `make setup TORCH_INDEX=` keeps pip's own index (for a GPU build).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench results results-issue20 clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, so that the range in pyproject.toml installs nothing larger: a wheel pip already has on this
	# machine (find-links, no download; then its dependencies from the usual index), else the CPU build from
	# TORCH_INDEX.
	if $(BIN)/python -m pip install -q --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null; then \
		$(BIN)/python -m pip install -q torch==$(TORCH_VERSION); \
	else \
		$(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
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

# docs/results_issue20.md: Sven's defaults against Adam/AdamW on the tasks of issue #20 (about 20 minutes on 2 cores).
results-issue20: setup
	PATH=$(abspath $(BIN)):$$PATH bash benchmarks/results.sh --issue20

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .benchmarks
