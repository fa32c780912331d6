# Deployment: image, wheelhouse, Molecule scenarios, the testbed fleet, lint.
# Included by the top Makefile (-include mk/*.mk). Docs: README.md, "Deploy to a fleet".

DEPLOY_VENV ?= .venv-deploy
DEPLOY_BIN := $(CURDIR)/$(DEPLOY_VENV)/bin
TESTBED := scripts/testbed
INVENTORY ?= inventory/testbed
SCENARIOS ?= tickle_delivery blocked_tickle_polling cem_mode
# The controller's environment: tools of the deploy venv, roles and collections of the repo, and
# the podman configuration this machine needs (runc, ulimits) — nothing is written under /etc.
DEPLOY_ENV := PATH="$(DEPLOY_BIN):$$PATH" \
	ANSIBLE_ROLES_PATH="$(CURDIR)/roles" \
	ANSIBLE_COLLECTIONS_PATH="$(CURDIR)/build/collections" \
	ANSIBLE_FORCE_COLOR=false \
	CONTAINERS_CONF="$(CURDIR)/build/testbed/containers.conf"

.PHONY: deploy-venv image image-trixie image-services wheelhouse molecule fleet fleet-down verify deploy-lint

deploy-venv: ## Controller venv (.venv-deploy): ansible-core, molecule, testinfra, linters; collections offline
	$(TESTBED)/deploy-venv.sh

image: ## Build the Debian 12 systemd host image (localhost/tickle-debian12) unless it exists
	$(TESTBED)/build-image.sh bookworm

image-trixie: ## Build the Debian 13 host image (localhost/tickle-debian13) unless it exists
	$(TESTBED)/build-image.sh trixie

image-services: ## Build the site-services image (Debian 12 + PostgreSQL) a scenario's database and index run on
	$(TESTBED)/build-image.sh services

wheelhouse: ## Wheels of tickle and its dependencies for the hosts' Python (3.11, 3.13): build/wheelhouse
	$(TESTBED)/wheelhouse.sh

# Scenarios run at once by `make molecule` (scripts/testbed/molecule.sh; make test: TEST_MOLECULE_JOBS).
MOLECULE_JOBS ?= 1

molecule: deploy-venv ## Every Molecule scenario (SCENARIOS=..., MOLECULE_JOBS=2: two at once): image, wheelhouse, run, clean up even on failure
	MOLECULE_JOBS=$(MOLECULE_JOBS) $(DEPLOY_ENV) $(TESTBED)/molecule.sh $(SCENARIOS)

fleet: deploy-venv image wheelhouse ## Testbed fleet of containers: site.yml, then a task through run_task.yml
	$(TESTBED)/fleet.sh up
	$(DEPLOY_ENV) ansible-playbook -i inventory/testbed playbooks/site.yml
	$(DEPLOY_ENV) ansible-playbook -i inventory/testbed playbooks/run_task.yml -e '{"tickle_run_command": "uname -n; uptime"}'

fleet-down: ## Remove the testbed fleet: containers, network, secrets, host side effects
	$(TESTBED)/fleet.sh down

# The scenarios' headline checks a fleet should also pass (molecule/tests/headline_NAME.py).
HEADLINES ?= tickle_delivery

verify: deploy-venv ## testinfra checks against a deployed fleet: make verify INVENTORY=inventory/prod [HEADLINES=...]
	$(DEPLOY_ENV) pytest -c molecule/tests/pytest.ini molecule/tests $(foreach h,$(HEADLINES),molecule/tests/headline_$(h).py) --ansible-inventory=$(INVENTORY)

DEPLOY_LINT := $(DEPLOY_ENV) yamllint -s roles playbooks inventory molecule .yamllint .ansible-lint \
	&& $(DEPLOY_ENV) ansible-lint --nocolor roles playbooks molecule

deploy-lint: deploy-venv ## ansible-lint (production profile) and yamllint on roles, playbooks, inventory, molecule
	$(DEPLOY_LINT)
