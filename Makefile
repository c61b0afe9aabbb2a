# Herald: `make run` starts the whole pipeline on embedded defaults; `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install system-deps run test lint schemas bench clean admin-key

# The CRD validator of tests/deploy (Node): its packages, as pinned in package-lock.json.
CRD_DIR := tests/deploy/crd

install: system-deps $(VENV)/.installed $(CRD_DIR)/node_modules/.package-lock.json

system-deps:
	@bash scripts/install-system-deps.sh

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

$(CRD_DIR)/node_modules/.package-lock.json: $(CRD_DIR)/package-lock.json $(CRD_DIR)/package.json
	@cd $(CRD_DIR) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

run: install
	@mkdir -p .data
	@$(BIN)/honcho -f Procfile -e dev.env start

# The first admin key of the default tenant, for the stack `make run` started (prints the secret once).
admin-key: install
	@set -a && . ./dev.env && set +a && $(BIN)/python -m services.admin create-key --tenant default --name admin

test: install
	@$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	@$(BIN)/ruff check .

schemas: install
	@$(BIN)/python -m shared.events

bench: install
	@command -v wrk >/dev/null || bash scripts/install-system-deps.sh wrk
	@$(BIN)/python -m bench

clean:
	rm -rf .data
