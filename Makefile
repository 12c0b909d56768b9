# Two entry points that do all the set-up on a fresh machine:
#   make chat   install, fetch the default model (SmolLM2-135M-Instruct) and chat with it
#   make test   install with the test extras and run the linter and the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TP_SERVER_TESTS := tests/test_server.py tests/test_server_apps.py tests/test_server_limits.py \
                   tests/test_server_tts.py
# On a CPU with AVX-512 these run again on the kernels an AVX2-only CPU gets (THRIFTY_CPU_ISA).
AVX2_KERNEL_TESTS := tests/test_quant_gguf.py tests/test_kernel_selection.py \
                     tests/test_fp8_kernels.py tests/test_kernels_cpu_ops.py \
                     tests/test_kernels_sampling.py tests/test_real_models.py

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
	# The server tests again, against a server on 2 ranks (tensor parallel; README "Scale out").
	$(BIN)/pytest -q $(TP_SERVER_TESTS) --tensor-parallel-size 2
	if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then \
	  THRIFTY_CPU_ISA=avx2 $(BIN)/pytest -q $(AVX2_KERNEL_TESTS); fi

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
