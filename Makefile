# Everything a fresh machine needs, from nothing: `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --config-settings editable_mode=compat -e '.[test]'
	touch $@

# System tools the end-to-end tests drive: curl and openssl (real TLS
# clients) and pebble (a real ACME server), from Debian's archive.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
deps:
	@missing=""; for tool in curl openssl pebble; do \
	  command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

demo: $(VENV)/.installed
	$(BIN)/twist --log-format=text tenantedge --demo

test: $(VENV)/.installed deps
	$(BIN)/trial $(TRIAL_ARGS) tests

clean:
	rm -rf $(VENV) tenantedge-demo _trial_temp
