# Two entry points that do all the set-up on a fresh machine:
#   make chat   install, fetch the default model (SmolLM2-135M-Instruct) and chat with it
#   make test   install with the test extras and run the linter and the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install chat serve test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch pinned: 2.13.0 is the local CPU wheel; a looser pin pulls GBs of CUDA packages.
	$(BIN)/pip install --quiet "torch==2.13.0" -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

chat: $(STAMP)
	$(BIN)/thrifty pull
	$(BIN)/thrifty chat

serve: $(STAMP)
	$(BIN)/thrifty pull
	$(BIN)/thrifty serve

test: $(STAMP)
	$(BIN)/ruff check thrifty tests benchmarks
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
