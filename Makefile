# Tickle — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# pytest processes for unit, integration, test and reliability (pytest-xdist; 0: none, in-process).
# --dist loadfile: a test module runs whole on one worker, so a fleet or browser its module-scoped
# fixtures start is started once (xdist's loadgroup marks are lost on pytest 9.2's node ids).
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist loadfile

-include mk/*.mk

.PHONY: help venv lint unit integration sysdeps test demo bench clean docs reliability screenshots

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(VENV)/.stamp: pyproject.toml requirements-dev.txt
	test -x $(PY) || $$(scripts/find-python.sh) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[server]' -r requirements-dev.txt
	touch $@

venv: $(VENV)/.stamp ## Create the development venv (Python >= 3.12 when present)

lint: venv ## ruff, ruff format --check, mypy strict on src/, the import contracts (pyproject.toml)
	$(BIN)/ruff check src tests bench molecule scripts
	$(BIN)/ruff format --check src tests bench molecule scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: venv deploy-venv ## Unit tests (the deploy venv runs the Ansible tests: vault, tickle_monitoring)
	$(BIN)/pytest -q $(XDIST) -m "not integration and not faults and not molecule"

integration: venv ## Integration tests: real processes on loopback
	$(BIN)/pytest -q $(XDIST) -m "integration"

sysdeps: ## System packages the tests need (nftables, iproute2, postgresql), installed when missing
	scripts/sysdeps.sh

# `make test` installs the two venvs and the system packages at once (pip and apt), then runs
# each check in turn: pytest on its own (with the testbed builds beside it: 1,397 s on 2 cores,
# against 474 s alone), deploy-lint, then the Molecule scenarios, TEST_MOLECULE_JOBS at once.
test: ## Every check: lint, unit, integration, faults, attacks, deploy lint, Molecule
	$(MAKE) --no-print-directory -j3 venv sysdeps deploy-venv
	$(MAKE) --no-print-directory lint
	$(BIN)/pytest -q $(XDIST) -m "not molecule" --durations=25
	$(MAKE) --no-print-directory deploy-lint
	$(MAKE) --no-print-directory molecule MOLECULE_JOBS=$(TEST_MOLECULE_JOBS)

# Molecule scenarios make test runs at once (each has its own containers and network): two took
# 1,627 s for the three scenarios against 2,390 s one at a time (TEST_MOLECULE_JOBS=1 for that).
TEST_MOLECULE_JOBS ?= 2

demo: venv ## Local fleet on loopback: nine steps, blocked-tickle and CEM paths (CONSOLE=1: keep the web console open)
	$(PY) -m tickle.demo $(if $(CONSOLE),--console)

# the README's Console section shows these (regenerated, never hand-made)
SCREENSHOTS := fleet run execution settings run-cancelled

screenshots: venv sysdeps ## Browser tests of the web console; their screenshots to build/screenshots, a few to docs/
	rm -rf build/screenshots
	$(BIN)/pytest -q tests/console
	mkdir -p docs/screenshots
	for name in $(SCREENSHOTS); do cp build/screenshots/$$name.png docs/screenshots/console-$$name.png; done

bench: venv ## Benchmarks S1-S8 of issue 10 and 10,000 waiting long-polls (ARGS="--only fleet --agents 2000", see --help); writes bench/results/
	$(PY) bench/run.py $(ARGS)

bench-micro: venv ## Micro-benchmarks of the task server's per-agent work in a fan-out (CPU-µs, best of rounds); writes bench/results/micro.json
	$(PY) bench/micro.py $(ARGS)

clean: ## Remove the venv and build output
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache .pytest_cache .import_linter_cache .grimp_cache

docs: venv ## Regenerate README's settings table and the generated sections of docs/ARCHITECTURE.md
	$(PY) scripts/settings_table.py --write
	$(PY) scripts/architecture.py --write

reliability: venv ## Run the fault and attack tests and rewrite RELIABILITY.md from their output
	rm -f build/reliability/results.jsonl
	$(BIN)/pytest -q $(XDIST) -m "faults or attacks"
	$(PY) scripts/reliability_report.py
