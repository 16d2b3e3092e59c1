# make demo: set up everything on a fresh machine and run the main job on sample images.
# make test: set up everything, lint, and run the test suite.
# Both are idempotent: the virtual env, weights and data are created once and reused.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned: these builds lie on the CI machines' local disk.
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
export TINYSAM_CACHE ?= $(CURDIR)/.cache/tinysam
export RAY_USAGE_STATS_ENABLED ?= 0
DEMO_OUTPUT ?= demo_output
DEMO_THREADS ?= $(shell nproc 2>/dev/null || echo 2)

# Two test processes, one test file each at a time, the longest files first (tests/conftest.py;
# `loadgroup` could split a file finer, but pytest-xdist 3.8 cannot mark groups on pytest 9):
# much of the suite waits on Ray and job subprocesses starting, which overlaps well on 2 cores
# (three were no faster and starved the kill-and-resume tests). The slowest tests are listed at
# the end.
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder --durations=25

.PHONY: demo predictor-demo lint test venv weights clean

# uv installs (the packages pip would pick, from the same indexes: pip's own extra indexes and
# find-links, e.g. a machine's local mirrors, are passed on) in under half of pip's time: it
# unpacks and byte-compiles in parallel (3.9 -> 1.6 min here, clean clone, cold uv cache).
# Byte-compiled because imports then need no compiling, also where PYTHONDONTWRITEBYTECODE is
# set. uv itself goes into the venv.
PIP_EXTRA_INDEXES = $(shell $(PYTHON) -m pip config get global.extra-index-url 2>/dev/null)
PIP_FIND_LINKS = $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV_INSTALL = $(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode --index-strategy unsafe-best-match \
	$(foreach u,$(PIP_EXTRA_INDEXES),--extra-index-url $(u)) $(foreach u,$(PIP_FIND_LINKS),--find-links $(u))

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv
	$(UV_INSTALL) $(TORCH_PACKAGES)
	$(UV_INSTALL) -c constraints.txt -e ".[dev]"
	touch $@

weights: venv
	$(PY) -m tinysam.fetch_weights mobile_sam

# The main job on the embedded default: a local Ray in-process, the real MobileSAM weights, the
# sample photos; a rerun skips the images already done. One single-threaded actor per core (on
# a CPU as fast as one actor with all cores, docs/benchmarks.md, and no OpenMP team to keep in
# step), and logical CPUs to spare for the read and write tasks.
# --overwrite: masks an older version stored with other settings are redone, not refused; masks
# of these settings are skipped, so a second run does nothing.
demo: weights
	$(PY) -m tinysam_samples $(DEMO_OUTPUT)/images > /dev/null
	$(PY) jobs/automask.py --input $(DEMO_OUTPUT)/images --output $(DEMO_OUTPUT)/masks \
		--model vit_t --checkpoint mobile_sam --preview 5 --coco-json $(DEMO_OUTPUT)/masks/coco.json \
		--num-cpus $$(( $(DEMO_THREADS) + 2 )) --concurrency $(DEMO_THREADS) --num-cpus-per-actor 1 --overwrite

# Prompted segmentation (points and boxes) on the sample photos, with SamPredictor.
predictor-demo: weights
	$(PY) jobs/predict_demo.py --checkpoint mobile_sam --output $(DEMO_OUTPUT)/predictor

# ruff: lint (pycodestyle, pyflakes, import order, bugbear) and the formatter's check, line length 120
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: weights lint
	$(PY) -m pytest -ra $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO_OUTPUT) .pytest_cache
