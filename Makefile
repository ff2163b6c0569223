# Basalt: `make demo` and `make test` work on a fresh machine; everything else is a helper.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test lint typecheck unit docs docs-check bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
	  || { echo "Basalt needs Python 3.11 or newer as $(PYTHON)"; exit 1; }
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

install: $(STAMP)

demo: install
	@bash scripts/demo.sh

lint: install
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

typecheck: install
	$(BIN)/mypy --strict -p basalt.machinery

unit: install
	$(BIN)/pytest -q -m "not vm" $(PYTEST_ARGS)

test: lint typecheck docs-check unit

docs: install
	$(BIN)/python -m basalt.machinery.config.reference

docs-check: install
	$(BIN)/python -m basalt.machinery.config.reference --check

bench: install
	$(BIN)/python bench/cli_startup.py
	$(BIN)/python bench/cluster_create.py
	$(BIN)/python bench/api_rtt.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
