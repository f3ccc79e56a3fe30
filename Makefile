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

# The demo runs on a local Ray cluster the way a user would: `ray start --head` from the venv (jobs inherit its
# PATH), jobs sent with `ray job submit` (token auth, Ray 2.60's default), the service with `serve deploy`.
DASHBOARD := http://127.0.0.1:8265
SERVICE := http://127.0.0.1:8000
RAY_CLI := PATH=$(CURDIR)/$(VENV)/bin:$$PATH RAY_AUTH_MODE=token
# Jobs run in an uploaded copy of the project (outputs/ is not uploaded), so they get absolute paths.
OUT := $(CURDIR)/outputs
JOB_PATHS := data.out=$(OUT)/prepared/phantoms-64 train.storage_path=$(OUT)/ray_results registry.root=$(OUT)/registry
SUBMIT := $(RAY_CLI) ray job submit --address $(DASHBOARD) --working-dir . --

demo: $(BASE)
	$(PY) jobs/make_phantoms.py --config configs/demo.yaml
	$(PY) jobs/prepare.py --config configs/demo.yaml
	$(RAY_CLI) ray status >/dev/null 2>&1 || $(RAY_CLI) ray start --head --dashboard-host 127.0.0.1 \
		--disable-usage-stats
	$(SUBMIT) python jobs/train.py --config configs/demo.yaml --set $(JOB_PATHS)
	$(SUBMIT) python jobs/tune.py --config configs/demo.yaml --set $(JOB_PATHS)
	$(RAY_CLI) serve deploy configs/serve.yaml --address $(DASHBOARD)
	$(PY) jobs/query.py --url $(SERVICE) --set query.wait_s=300 \
		--file outputs/phantoms/boneage-training-dataset/boneage-training-dataset/200001.png --sex F --age 120
	$(PY) jobs/query.py --url $(SERVICE) --file outputs/phantom-dicom/200002.dcm \
		--overlay outputs/demo-overlay.png
	@echo
	@echo "The service is running. Open $(SERVICE)/ in a browser (API docs: $(SERVICE)/docs)."
	@echo "Ask it from the shell:  curl -F file=@outputs/phantom-dicom/200002.dcm $(SERVICE)/v1/predict"
	@echo "Stop it and the local Ray cluster:  source $(VENV)/bin/activate && ray stop"

test: $(DEV)
	$(PY) -m pytest

test-fast: $(DEV)
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf outputs
