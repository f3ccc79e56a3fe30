# Two commands: `make demo` and `make test`. Both create .venv when missing and install the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.installed-base
DEV := $(VENV)/.installed-dev

.PHONY: demo stop test test-fast test-shuffled clean

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

# The demo runs on a Ray cluster of its own (own temp dir and ports, recorded in outputs/ray-cluster.json and found
# again by the next run), beside any other cluster on the machine: boneage.cluster starts it, submits the jobs with
# a runtime env naming this venv's python and shipping the library, deploys Serve on a free port, and stops it.
CLUSTER := $(PY) -m boneage.cluster
# Jobs run in an uploaded copy of the project (outputs/ is not uploaded), so they get absolute paths. The prepare
# step is a job too: run here, Ray's auto-discovery would join whatever cluster it finds on the machine.
OUT := $(CURDIR)/outputs
DATA_PATHS := data.labels=$(OUT)/phantoms/boneage-training-dataset.csv data.images=$(OUT)/phantoms \
	data.out=$(OUT)/prepared/phantoms-32
JOB_PATHS := data.out=$(OUT)/prepared/phantoms-32 train.storage_path=$(OUT)/ray_results registry.root=$(OUT)/registry

demo: $(BASE)
	$(PY) jobs/make_phantoms.py --config configs/demo.yaml
	$(CLUSTER) start
	$(CLUSTER) submit -- python jobs/prepare.py --config configs/demo.yaml --set $(DATA_PATHS)
	$(CLUSTER) submit -- python jobs/train.py --config configs/demo.yaml --set $(JOB_PATHS)
	$(CLUSTER) submit -- python jobs/tune.py --config configs/demo.yaml --set $(JOB_PATHS)
	$(CLUSTER) serve-deploy configs/serve.yaml
	$(PY) jobs/query.py --url $$($(CLUSTER) service-url) --set query.wait_s=300 \
		--file outputs/phantoms/boneage-training-dataset/boneage-training-dataset/200001.png --sex F --age 120
	$(PY) jobs/query.py --url $$($(CLUSTER) service-url) --file outputs/phantom-dicom/200002.dcm \
		--overlay outputs/demo-overlay.png
	@url=$$($(CLUSTER) service-url) && echo && \
	echo "The service is running. Open $$url/ in a browser (API docs: $$url/docs)." && \
	echo "Ask it from the shell:  curl -F file=@outputs/phantom-dicom/200002.dcm $$url/v1/predict" && \
	echo "Stop it and the demo's Ray cluster (only that one):  make stop"

# Stops the demo's cluster only; `ray stop` would end every Ray cluster on the machine.
stop:
	$(CLUSTER) stop

test: $(DEV)
	$(PY) -m pytest

test-fast: $(DEV)
	$(PY) -m pytest -m "not slow"

# The suite in a random order (pytest-randomly; the header prints the seed, --randomly-seed=N repeats it): no test
# may rely on another having run first.
test-shuffled: $(DEV)
	$(PY) -m pytest -p randomly

clean:
	rm -rf outputs
