# Two commands for a fresh clone:  `make demo`  and  `make test`.
# Both bootstrap .venv (torch pinned to the CPU wheel on machines without nvidia-smi) and are
# idempotent: the second run only re-installs when pyproject.toml or the constraints change.
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
HAS_GPU   := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
CONSTRAINTS := $(if $(HAS_GPU),,constraints-cpu.txt)
EXTRAS    ?= dali,wandb,onnx,dev
PYTEST_ARGS ?=

.PHONY: demo test env system bench clean-env lock

$(STAMP): pyproject.toml constraints-cpu.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	PIP_CONSTRAINT=$(CONSTRAINTS) $(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	@touch $(STAMP)

env: $(STAMP)

# System services the test suite uses (Slurm + munge + MariaDB/slurmdbd, OpenMPI).
# Installs only as root with apt-get and only what is missing; otherwise prints what to install.
system:
	@bash tests/cluster/install-system.sh

demo: $(STAMP)
	$(BIN)/hpc demo $(DEMO_ARGS)

test: $(STAMP) system
	$(BIN)/python -m ruff check hpc tests bench
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/codecs.py && $(BIN)/python bench/convert.py && $(BIN)/python bench/loader.py && \
		$(BIN)/python bench/step.py && $(BIN)/python bench/ddp.py && $(BIN)/python bench/fletcher32.py

clean-env:
	rm -rf $(VENV)

# containers/requirements.lock: every transitive dependency of containers/requirements.txt, pinned
# with hashes, for Python >= 3.11 on any platform (needs uv: `pip install uv`; resolves on PyPI). The
# base image's torch and numpy stay out (containers/lock-overrides.txt). Rerun after changing the pins.
lock:
	uv pip compile containers/requirements.txt --universal --python-version 3.11 --generate-hashes \
	    --override containers/lock-overrides.txt --no-config --index-url https://pypi.org/simple \
	    -o containers/requirements.lock
