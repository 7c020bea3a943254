# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing.
VENV ?= .venv
PYTHON ?= python3
PIP := $(VENV)/bin/pip install --disable-pip-version-check --quiet
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/infu run --config configs/embedded.yaml

test: $(STAMP)
	$(VENV)/bin/pytest

bench: $(STAMP)
	for script in bench/*.py; do $(VENV)/bin/python $$script || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check infu filtering flows tests bench
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf runs .pytest_cache
