# make demo: set up and run the CPU demo. make test: set up and run the tests.
# make docs: build the documentation site into site/ (mkdocs.yml), offline.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast setup data docs clean

demo: setup data
	$(BIN)/sere demo

test: setup data
	$(BIN)/python -m pytest -q -n auto --dist loadgroup

test-fast: setup
	$(BIN)/python -m pytest -q -n auto --dist loadgroup -m "not slow"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,docs]'
	touch $(STAMP)

data:
	./scripts/install-fashion-mnist.sh

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) runs site
