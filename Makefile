# Codeplan: `make run` starts the whole system, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-faults test-clients clients browser bench migrate clean venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/codeplan run

migrate: $(STAMP)
	$(BIN)/codeplan migrate

test: $(STAMP)
	$(BIN)/python -m pytest -q tests --ignore=tests/clients

# The fault suite alone (also part of `make test`): SIGKILLs of the bridge, a PostgreSQL restart.
test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -s tests/faults

# The browser tests' needs: Debian's Chromium and a CJK font (apt-get, as root), axe-core from npm
# into a cache outside the repository. Without them `make test` skips the browser tests, saying so.
browser:
	tests/browser/install.sh --apt

# The real coding tools from npm, in a cache outside the repository (CODEPLAN_CLIENTS_DIR).
clients:
	tests/clients/install.sh

test-clients: $(STAMP) clients
	$(BIN)/python -m pytest -q tests/clients

# Needs wrk (Debian's package; installed here when missing) and py-spy for --profile.
bench: $(STAMP)
	@command -v wrk >/dev/null || (apt-get update -q && apt-get install -y -q wrk) >/dev/null
	@test -x $(BIN)/py-spy || $(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache
