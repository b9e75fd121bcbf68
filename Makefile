# Quick start:   make repro   (set up + run the whole pipeline)
#                make test    (set up + run the test suite)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: setup repro test clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

repro: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro

test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q

clean:
	rm -rf $(VENV) models samples evaluation data/prepared mlflow.db mlartifacts
