# Two commands on a fresh machine: `make run` (the proxy on 127.0.0.1:8080) and `make test`.
# `make demo` is an extra: mock providers, Metrion and its dashboard on demo/, fed weeks of traffic, offline.
# Both build .venv from the Python that .python-version selects (3.12, through pyenv).

VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat .python-version)
CONFIG ?= $(if $(wildcard config.yaml),config.yaml,config.example.yaml)

# The example config reads provider keys from these; empty means "no stored key" (pass-through still works).
export OPENAI_API_KEY ?=
export ANTHROPIC_API_KEY ?=

# Debian packages the tests drive for real: curl (HTTP/2 in a tunnel), redis-server and postgresql (shared
# state), chromium (the dashboard in a browser), haproxy (several instances behind a balancer), nodejs and npm
# (the benchmark installs Portkey's gateway from npm to compare with; its smoke run is part of the tests).
# Each pair is a command and the Debian package that brings it; only packages whose command is missing are
# installed (a machine may already have Node.js from elsewhere, whose nodejs conflicts with Debian's npm).
DEBIAN_NEEDS := curl:curl redis-server:redis-server pg_ctlcluster:postgresql haproxy:haproxy chromium:chromium \
	node:nodejs npm:npm

.PHONY: run test demo lint bench clean debian-packages

debian-packages:
	@missing=""; for need in $(DEBIAN_NEEDS); do \
		command -v $${need%%:*} >/dev/null || missing="$$missing $${need#*:}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing Debian packages for the tests:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else \
			echo "make test needs Debian packages. As root, run:"; \
			echo "  apt-get update && apt-get install -y$$missing"; exit 1; \
		fi; \
	fi

$(STAMP): pyproject.toml .python-version
	@python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else "python3 is %s; Metrion needs 3.12+ (pyenv reads .python-version)" % sys.version.split()[0])'
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/mitmdump -s metrion_addon/addon.py --set metrion_config=$(CONFIG) \
		--listen-host 127.0.0.1 --listen-port 8080 --set connection_strategy=lazy

test: $(STAMP) debian-packages
	$(BIN)/ruff check .
	$(BIN)/pytest -n 3

demo: $(STAMP)
	$(BIN)/python -m metrion_addon.demo

bench: $(STAMP)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/crash_loss.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
