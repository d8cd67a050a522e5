# The two commands of README.md: `make run` and `make test`.
# Both create .venv on first use; `make test` also installs the real peers the tests need.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CODE   := relay tests twisted $(wildcard bench)

.PHONY: run test lint typecheck pytest peers bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); apt-get update -q && apt-get install -y -q python3-venv && $(PYTHON) -m venv $(VENV); }

$(STAMP): pyproject.toml $(BIN)/python
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q --config-settings editable_mode=compat -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/twistd --nodaemon --pidfile= --logger relay.logfile.observer relay

peers:
	sh tests/install-peers.sh

lint: $(STAMP)
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)

typecheck: $(STAMP)
	$(BIN)/mypy --strict relay

pytest: $(STAMP) peers
	$(BIN)/pytest

test: lint typecheck pytest

clean:
	rm -rf $(VENV) build *.egg-info
