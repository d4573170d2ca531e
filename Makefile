# The two entry points of the README. Both set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000

.PHONY: setup serve test lint typecheck gpu-check-files

setup:
	@bash scripts/bootstrap.sh $(VENV)

serve: setup
	$(VENV)/bin/kvrun serve --host 127.0.0.1 --port $(PORT)

# OMP_WAIT_POLICY as the kvrun command sets it: the tests run engines in the pytest
# process beside the servers they start, and spinning OpenMP threads stall each other.
test: setup
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) -m pytest tests plugins/*/tests -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

# What benchmarks/gpu_check.sh needs beside the working tree on the borrowed GPU machine
# (no network there), which the device call carries: SmolLM2's tokenizer files and a
# setuptools wheel new enough for an editable install.
GPU_CHECK_FILES := benchmarks/models/gpu-check
gpu-check-files: setup
	$(PY) -c "from kvrun.testing.checkpoints import save_tokenizer_from_gguf as s; \
	print(s(None, '$(GPU_CHECK_FILES)/tokenizer'))"
	$(PY) -m pip download --no-deps --only-binary=:all: -q -d $(GPU_CHECK_FILES)/wheels \
	"setuptools>=70.1"
