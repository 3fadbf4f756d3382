# The two commands: `make dev` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test lint typecheck unit integration e2e bench install postgres browser screenshots clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian's PostgreSQL server for the throwaway test clusters (we run as root here).
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "installing Debian's postgresql"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	fi

# Debian's Chromium and its driver for the browser tests (tests/browser); nothing downloads
# a browser of its own.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		echo "installing Debian's chromium and chromium-driver"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

dev: install
	$(BIN)/contact-deletion dev

lint: install
	$(BIN)/ruff check service tests
	$(BIN)/ruff format --check service tests

typecheck: install
	$(BIN)/mypy

# Worker processes for the tests (pytest-xdist). Each worker starts its own Kafka broker and
# PostgreSQL cluster (session fixtures), so the workers share nothing but the machine.
# TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 3

test: install postgres browser lint typecheck
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist load

# The README's pictures of the console: the browser tests, saving each page as they go.
screenshots: install browser
	rm -f docs/screenshots/*.png
	CONSOLE_SCREENSHOTS=docs/screenshots $(BIN)/python -m pytest -q tests/browser -k sqlite

bench: install
	$(BIN)/contact-deletion bench

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
