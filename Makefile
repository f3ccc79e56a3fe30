# Two commands: `make demo` and `make test`. Both create .venv when missing and install the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.installed-base
DEV := $(VENV)/.installed-dev

.PHONY: demo test test-fast clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# pip takes torch 2.14.1 / torchvision 0.29.1 from the machine's local wheel cache where it has one.
$(BASE): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(DEV): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@ $(BASE)

demo: $(BASE)
	$(PY) jobs/make_phantoms.py --config configs/demo.yaml
	$(PY) jobs/prepare.py --config configs/demo.yaml
	$(PY) jobs/train.py --config configs/demo.yaml

test: $(DEV)
	$(PY) -m pytest

test-fast: $(DEV)
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf outputs
