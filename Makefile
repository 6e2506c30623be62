# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint benchmarks clean

# constraints.txt pins a set that installs and works together here (torch CPU 2.13.0,
# prefect 3.8.x with fastapi<0.155, ...). uv installs it in ~30 s where pip took ~105 s (most of
# a fresh clone's `make test` budget); uv reads no pip configuration, so the machine's local
# wheel folders (PIP_FIND_LINKS: the CPU build of torch) are passed on.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq -c constraints.txt uv
	$(VENV)/bin/uv pip install -q --python $(PY) -c constraints.txt \
		$(foreach links,$(PIP_FIND_LINKS),--find-links $(links)) -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/radflow demo

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) artifacts .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
