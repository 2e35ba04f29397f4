# The two commands of the README:
#   make run    set up ./.venv and run the demo (examples/tenement.toml) on 127.0.0.1:8000
#   make test   set up ./.venv with the test extras, then ruff and the whole test suite
PYTHON ?= python3
VENV := .venv
BIND ?= 127.0.0.1:8000
TEN := bench/.ten-venv/bin/ten

.PHONY: run test lint bench screenshots clean

run: $(VENV)/.installed
	./scripts/system-deps.sh run
	$(VENV)/bin/python manage.py runsupervisor --config examples/tenement.toml --bind $(BIND)

test: $(VENV)/.installed-dev $(TEN)
	./scripts/system-deps.sh test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(VENV)/.installed-dev $(TEN)
	./scripts/system-deps.sh bench
	$(VENV)/bin/python bench/supervisor_idle.py
	$(VENV)/bin/python bench/isolation.py
	$(VENV)/bin/python bench/proxy.py
	$(VENV)/bin/python bench/tcp.py
	$(VENV)/bin/python bench/log_search.py
	$(VENV)/bin/python bench/dashboard.py
	$(VENV)/bin/python bench/metrics_overhead.py
	$(VENV)/bin/python bench/edge.py

# The dashboard's browser tests, saving full-page PNGs of the main pages for the README.
screenshots: $(VENV)/.installed-dev
	./scripts/system-deps.sh test
	TENEMENT_SCREENSHOTS=docs/screenshots $(VENV)/bin/pytest tests/test_browser.py

# Upstream tenement, the benchmarks' peer: its own venv, never a dependency of ours.
$(TEN):
	$(PYTHON) -m venv bench/.ten-venv
	bench/.ten-venv/bin/pip install --quiet tenement==0.2.2

$(VENV)/bin/python:
	./scripts/system-deps.sh run
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) tenement-data *.egg-info
