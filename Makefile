# hl7bridge — every target sets up what it needs on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help run test lint fmt bench tools clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

tools: ## install distribution tools the tests use (promtool) when missing
	@command -v promtool >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -q prometheus >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q prometheus >/dev/null 2>&1)) || \
	    echo "promtool could not be installed; alert-rule tests will be skipped"; \
	  else echo "promtool missing and apt-get unavailable; alert-rule tests will be skipped"; fi; }

run: $(STAMP) ## start the bridge: MLLP :2575, HTTP :9575, SQLite in ./hl7bridge-data
	$(BIN)/hl7bridge serve

test: $(STAMP) tools ## lint, then the whole test suite (starts its own PostgreSQL)
	$(BIN)/ruff check hl7bridge tests $(wildcard bench)
	$(BIN)/pytest -q

lint: $(STAMP) ## ruff
	$(BIN)/ruff check hl7bridge tests $(wildcard bench)

fmt: $(STAMP)
	$(BIN)/ruff check --fix hl7bridge tests $(wildcard bench)

bench: $(STAMP) ## run the benchmarks against the peers, write bench/RESULTS.md
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache hl7bridge-data
