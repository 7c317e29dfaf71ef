# `make test` and `make demo` create .venv on first use and install vlmsafe into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlmsafe-installed

.PHONY: test test-slow lint demo install dist docs clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, from the tested pair (see README "Installation"), then everything at the tested versions.
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check vlmsafe probes tests benchmarks docs setup.py

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/vlmsafe demo --overwrite

# The wheel and the sdist (the wheel is built from the sdist, so both carry the same files), checked by twine.
dist: $(STAMP)
	rm -rf dist build
	$(PY) -m build --no-isolation --outdir dist .
	$(VENV)/bin/twine check --strict dist/*

# The documentation site (mkdocs.yml, docs/) into site/: API reference from the docstrings, CLI reference from the
# argument parsers (docs/gen_cli.py), task pages. --strict: any warning fails the build.
DOCS_STAMP := $(VENV)/.vlmsafe-docs-installed

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	HF_HUB_OFFLINE=1 NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache dist build site
