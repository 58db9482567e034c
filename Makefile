# Everything a fresh machine needs, from nothing: `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test deps typecheck apidocs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --config-settings editable_mode=compat -e '.[test]'
	# Twisted's plugin caches, built now rather than by the first plugin scan
	# (a test's, or a server's that cannot write them).
	$(BIN)/python -m tenantedge.plugincache >/dev/null
	touch $@

# System tools the end-to-end tests drive: curl and openssl (real TLS
# clients), pebble (a real ACME server) and redis-server (the store a fleet
# shares), from Debian's archive.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
deps:
	@missing=""; for tool in curl openssl pebble redis-server; do \
	  command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

demo: $(VENV)/.installed
	$(BIN)/twist --log-format=text tenantedge --demo

# Type-check the package (settings in mypy.ini).
typecheck: $(VENV)/.installed
	$(BIN)/mypy tenantedge

# The API reference, from the docstrings (epytext), into apidocs/ (settings
# in pydoctor.ini); any pydoctor warning fails it.
VERSION = $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' tenantedge/__init__.py)
apidocs: $(VENV)/.installed
	rm -rf apidocs
	$(BIN)/pydoctor --config=pydoctor.ini --quiet --project-version=$(VERSION) tenantedge
	@echo "API reference: apidocs/index.html"

test: $(VENV)/.installed deps typecheck apidocs
	$(BIN)/trial $(TRIAL_ARGS) tests

clean:
	rm -rf $(VENV) tenantedge-demo _trial_temp apidocs .mypy_cache
