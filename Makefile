# Two commands on a fresh Debian/Ubuntu machine with Python 3.11+:
#   make demo   - set up .venv and run a local demo cluster
#   make test   - set up .venv and run the test suite
# Both are idempotent. redis-server is installed with apt-get when run as root and missing.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench compose-check base-images redis-server python-ok clean

python-ok:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || \
	  { echo "gpubroker needs Python 3.11+; $(PYTHON) is $$($(PYTHON) --version 2>&1). Set PYTHON=python3.11"; exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; \
	  else echo "Python's venv module is missing: run 'sudo apt-get install python3-venv'"; exit 1; fi; }

$(STAMP): pyproject.toml | python-ok
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	@# torch only for the gang gloo test (tests/e2e/test_gangs.py): the CPU wheel where the index
	@# offers it (a plain torch pulls ~5 GB of CUDA); without it that test skips, saying why.
	$(BIN)/pip install -q 'torch==2.13.0+cpu' || echo "torch CPU wheel not offered; the gloo test will skip"
	touch $(STAMP)

redis-server:
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing redis-server (and redis-cli, for bench.react) with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools; \
	  else echo "redis-server or redis-cli is missing: run 'sudo apt-get install redis-server redis-tools' and retry"; \
	    exit 1; fi; }

demo: $(STAMP) redis-server
	$(BIN)/gpubroker demo

test: $(STAMP) redis-server
	$(BIN)/ruff check broker workers tests bench
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check broker workers tests bench
	$(BIN)/mypy

bench: $(STAMP) redis-server
	$(BIN)/python -m bench.dispatch
	$(BIN)/python -m bench.submit
	$(BIN)/python -m bench.e2e
	$(BIN)/python -m bench.react
	$(BIN)/python -m bench.scale
	$(BIN)/python -m bench.affinity --nodes 4 --gpus 1 --slots 1
	$(BIN)/python -m bench.affinity --nodes 2 --gpus 2 --slots 2

# docker-compose.yml in a real Docker engine (Compose v2): scale, Redis restart, drain, nothing
# lost. Not part of `make test`; its last run's output is docs/compose-check.txt.
compose-check: $(STAMP)
	$(BIN)/python -m bench.compose_check --output docs/compose-check.txt

# python:3.11-slim and redis:7 built locally from a Debian root filesystem (no registry needed).
base-images:
	scripts/base_images.sh

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
