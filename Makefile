# difflab: `make demo` and `make test` set everything up from a bare Python and run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.difflab-installed
# The CPU build of PyTorch, pinned for laptops and CI; pyproject.toml itself accepts any torch>=2.2.
TORCH  ?= torch==2.13.0
# k-diffusion, a test-only peer, installed with --no-deps: its declared dependencies would replace
# that torch by a CUDA build, and its sampling.py needs only these (benchmarks/peer_kdiffusion.py).
KDIFFUSION := k-diffusion==0.1.1.post1 torchsde==0.2.6 torchdiffeq==0.2.5 trampoline==0.1.2

.PHONY: setup demo test bench lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,text,dev,explore,finetune]'
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps $(KDIFFUSION)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/difflab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

lint: $(STAMP)
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
