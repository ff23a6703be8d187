# Two entry points for a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CLIENTS_VENV := .venv-clients
CLIENTS_STAMP := $(CLIENTS_VENV)/.installed

.PHONY: install serve test container-test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# the TGI and LoRAX clients pin huggingface-hub<1.0: their own venv for tests/test_official_clients.py
$(CLIENTS_STAMP): tests/clients-requirements.txt
	$(PY) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/pip install -q -r tests/clients-requirements.txt
	touch $(CLIENTS_STAMP)

serve: $(STAMP)
	$(BIN)/olora serve --host 127.0.0.1 --port 8000

test: $(STAMP) $(CLIENTS_STAMP)
	bash scripts/install_system_deps.sh   # nginx and promtool for the deployment tests (apt, as root)
	$(BIN)/python -m pytest -q

# Builds the image (CPU variant, local Debian base) with podman and runs it as deploy/ does (docs/deploy.md).
# Root, no GPU: 6-16 min on a fresh machine, ~2 min with the base and layers cached. CT_ARGS=--cold: from scratch.
container-test:
	bash scripts/container_test.sh $(CT_ARGS)

clean:
	rm -rf $(VENV) $(CLIENTS_VENV) build *.egg-info .pytest_cache
