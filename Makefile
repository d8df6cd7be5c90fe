# megatron-elastic: the two commands of the README, and what they need.
#   make test        create .venv if missing, install the pinned stack, run the whole test suite
#                    (two workers)
#   make quickstart  the main job: the tiny CPU recipe end to end
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The stamp records a completed install of exactly these inputs: a second run installs nothing.
STAMP := $(VENV)/.installed
INSTALL_INPUTS := requirements/base.txt requirements/dev.txt requirements/lock.txt setup.py
MAMBA_SSM := mamba-ssm==2.3.2.post1

.PHONY: install test test-fast quickstart lint format clean

install: $(STAMP)

$(STAMP): $(INSTALL_INPUTS)
	@test -x $(PY) || { py=$$(scripts/find_python312.sh) && echo "creating $(VENV) with $$py" && $$py -m venv $(VENV); }
	$(PIP) install -q --upgrade "pip>=25"
	# llama-cpp-python (dev.txt) compiles llama.cpp on the first install (several minutes on 2 cores,
	# docs/reproducibility.md); pip's wheel cache makes later installs take seconds. Its multimodal library (mtmd) is
	# not built: nothing here uses it. Set CMAKE_ARGS to build it differently.
	@echo "installing the pinned stack (the first install compiles llama.cpp for llama-cpp-python)"
	CMAKE_ARGS="$${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" \
		$(PIP) install -q -c requirements/lock.txt -r requirements/base.txt -r requirements/dev.txt
	# mamba-ssm: only its Python/Triton parts; its CUDA extension is not compiled
	# (docs/background.md#mamba-ssm-without-its-cuda-extension).
	MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $(PIP) install -q --no-build-isolation --no-deps $(MAMBA_SSM)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@touch $@
	@echo "installed the pinned stack into $(VENV)"

# Two pytest-xdist workers of one thread each (TEST_WORKERS=0: one process); a file's tests share
# a worker, and so do the SLURM files (tests/conftest.py's scheduler).
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -n $${TEST_WORKERS:-2} --dist loadfile tests

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow and not distributed"

quickstart: $(STAMP)
	$(PY) tools/quickstart.py --output runs/quickstart

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
