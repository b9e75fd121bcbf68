# Quick start:   make repro   (set up + run the whole pipeline)
#                make test    (set up + run the test suite)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: setup repro test exps clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

repro: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro

test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q

# experiments side by side, headline numbers first: judged accuracy, FD, hardest class, then what differs
HEADLINE := Experiment|Created|.*accuracy_generated|.*\.frechet_distance|.*frechet_distance_real_reference|.*worst_class.*|wall_time_s|seconds_per_image|data.source|train.epochs|sample.sampler|sample.steps|sample.guidance_scale
exps: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc exp show --drop '.*' --keep '$(HEADLINE)'

clean:
	rm -rf $(VENV) models samples evaluation data/prepared mlflow.db mlartifacts
