# Two commands on a fresh machine (Python 3.11 and Java 17 present): `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps demo lint test test-fast fashion lock wheel pack-env clean-workspace

install: $(STAMP)

$(STAMP): requirements.lock setup.cfg pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	@command -v java >/dev/null || { echo "need Java 17 for Spark"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: install
	$(BIN)/matcher demo

# Headless Chromium and a CJK font, for the test that renders the nightly report (Debian packages; needs root).
system-deps:
	@if ! command -v chromium >/dev/null || ! fc-list 2>/dev/null | grep -qi "wenquanyi\|noto sans cjk"; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-zenhei >/dev/null; \
	  else echo "note: no chromium: the report test is skipped; no CJK font: Chinese shows as boxes"; fi; \
	fi

lint: install
	$(BIN)/ruff check .

# Both tiers: the fast one (pure steps) and the integration one (Spark, Airflow, SeaweedFS, subprocesses).
test: install system-deps lint
	$(BIN)/python -m pytest

# The pure-step tier alone: no Spark, Airflow, S3 server or subprocess.
test-fast: install
	$(BIN)/python -m pytest -m "not integration"

# The whole pipeline on the shared fashion catalog (9,583 products), lake in /tmp/lake.
fashion: install
	$(BIN)/matcher run --catalog ../shared/data/fashion --lake file:///tmp/lake --date 2026-01-01

# The lock (every package of the environment, with hashes) from requirements.txt and requirements-dev.txt; for
# Linux x86_64 and CPython 3.11, as the install runs here. Needs uv (pip install uv).
lock:
	uv pip compile requirements.txt requirements-dev.txt --generate-hashes --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --quiet -o requirements.lock.new
	{ echo "# The whole environment, pinned with hashes: \`make install\` installs it with --require-hashes."; \
	  echo "# Regenerate after changing requirements*.txt: \`make lock\` (needs uv: pip install uv)."; \
	  tail -n +3 requirements.lock.new; } > requirements.lock && rm requirements.lock.new

# A wheel with the schemas, the DAG and the defaults inside: `pip install --require-hashes -r requirements.lock`
# then `pip install --no-deps dist/matcher-*.whl` on a machine with nothing else of this repository.
wheel: install
	$(BIN)/pip wheel --quiet --no-deps --no-build-isolation -w dist .

# The environment executors unpack in cluster mode (spark.python_env = "dist/matcher-env.tar.gz"): the locked
# packages and the wheel (not this checkout), packed by venv-pack. Workers need only the same base Python, at the path
# the venv names (its bin/python links to it), and no venv or repository of their own.
pack-env: wheel
	rm -rf build/pack-env dist/matcher-env.tar.gz
	$(PYTHON) -m venv build/pack-env
	build/pack-env/bin/pip install --quiet --require-hashes -r requirements.lock
	build/pack-env/bin/pip install --quiet --no-deps dist/matcher-*.whl
	$(BIN)/venv-pack --quiet -p build/pack-env -o dist/matcher-env.tar.gz

clean-workspace:
	rm -rf .matcher
