# Herald: `make run` starts the whole pipeline on embedded defaults; `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install system-deps run test lint schemas bench clean

install: system-deps $(VENV)/.installed

system-deps:
	@bash scripts/install-system-deps.sh

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

run: install
	@mkdir -p .data
	@$(BIN)/honcho -f Procfile -e dev.env start

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
