# Two commands on a fresh machine (Python 3.11 and Java 17 present): `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test fashion clean-workspace

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt setup.cfg pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	@command -v java >/dev/null || { echo "need Java 17 for Spark"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: install
	$(BIN)/matcher demo

test: install
	$(BIN)/python -m pytest

# The whole pipeline on the shared fashion catalog (9,583 products), lake in /tmp/lake.
fashion: install
	$(BIN)/matcher run --catalog ../shared/data/fashion --lake file:///tmp/lake --date 2026-01-01

clean-workspace:
	rm -rf .matcher
