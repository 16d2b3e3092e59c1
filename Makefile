# make demo: set up everything on a fresh machine and run the main job on sample images.
# make test: set up everything and run the test suite.
# Both are idempotent: the virtual env, weights and data are created once and reused.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned: these builds lie on the CI machines' local disk.
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
export TINYSAM_CACHE ?= $(CURDIR)/.cache/tinysam
export RAY_USAGE_STATS_ENABLED ?= 0
DEMO_OUTPUT ?= demo_output

.PHONY: demo test venv weights clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PACKAGES)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

weights: venv
	$(PY) -m tinysam.fetch_weights mobile_sam

demo: weights
	$(PY) jobs/predict_demo.py --output $(DEMO_OUTPUT)

test: weights
	$(PY) -m pytest -ra $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO_OUTPUT) .pytest_cache
