# brats2d: `make demo` (synthetic data -> dataset -> models) and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned for this project's machines (CPU here, CUDA on GPU hosts); users may override, pyproject allows torch>=2.4.
TORCH ?= torch==2.14.1 torchvision==0.29.1

BRATS_DIR ?=
DATA ?= datasets/brats2023.h5
JOBS ?= -1
MODALITY ?= t2f
NPROC ?= 1
ARGS ?=

DEMO_DIR ?= datasets/synthetic
DEMO_DATA ?= datasets/demo.h5
DEMO_CASES ?= 120
DEMO_ARGS ?= --epochs 6 --batch-size 8 --crop 128 --workers 1 --encoder resnet18 --encoder-weights none
# whole-volume BraTS 2023 scores of every approach on the first test patients (all 18 would add ~10 min on 2 cores),
# and their report (runs/demo/comparison_volumes.html)
DEMO_VOLUMES ?= --volumes $(DEMO_DIR) --volume-cases 3 --report
# train/compare use the real dataset when it was built, else the demo's
TRAIN_DATA ?= $(if $(wildcard $(DATA)),$(DATA),$(DEMO_DATA))

# The recommended whole-volume recipe (README, "What a budget buys"): every tumour slice and 4 background slices per
# case with two neighbouring slices on each side, one early-fusion region model per plane (three), trained for
# RECIPE_MINUTES in all (shared by the planes' models: fit --time-limit, poly decay over it). 30 minutes is the
# CPU budget the README measured; on a GPU give more, e.g. RECIPE_MINUTES=120 and RECIPE_FIT without the CPU sizes.
RECIPE_DIR ?= runs/recipe
RECIPE_PLANES ?= axial coronal sagittal
RECIPE_MINUTES ?= 30
RECIPE_BUILD ?= --context 2 --slices-per-case all --background-slices 4
RECIPE_FIT ?= --context 2 --task regions --schedule poly --epochs 10000 --patience 10000 \
	--encoder resnet18 --encoder-weights none --crop 128 --batch-size 16

.PHONY: setup browser dataset demo train compare cv recipe test bench clean

setup: $(VENV)/.installed browser

# Headless Chromium (Debian's) for the report's browser test: installed where apt-get may run (as root, or sudo
# without a password); elsewhere the test skips and says why, and nothing else needs it.
browser:
	@command -v chromium > /dev/null || command -v chromium-browser > /dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then APT="apt-get"; elif sudo -n true 2> /dev/null; then APT="sudo apt-get"; fi; \
	  if [ -n "$$APT" ] && command -v apt-get > /dev/null; then \
	    ($$APT install -y -q chromium > /dev/null 2>&1 || { $$APT update -q > /dev/null 2>&1 && \
	      $$APT install -y -q chromium > /dev/null 2>&1; }) || echo "chromium could not be installed: the browser test skips"; \
	  else echo "no chromium (apt-get install chromium): the report's browser test skips"; fi; }

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $@

dataset: setup
	@if [ -z "$(BRATS_DIR)" ]; then \
	  echo "Set BRATS_DIR to your BraTS 2023 training folder, e.g."; \
	  echo "  make dataset BRATS_DIR=~/data/ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"; \
	  echo "BraTS 2023 needs a free registration on Synapse (https://www.synapse.org/brats2023)."; \
	  echo "No data yet? 'make demo' runs everything on synthetic cases."; \
	  exit 2; fi
	$(VENV)/bin/brats-build build "$(BRATS_DIR)" $(DATA) --jobs $(JOBS) $(ARGS)
	$(VENV)/bin/brats-build info $(DATA)

$(DEMO_DATA): | setup
	$(VENV)/bin/brats-build synth $(DEMO_DIR) --cases $(DEMO_CASES) --seed 0 --jobs $(JOBS)
	$(VENV)/bin/brats-build build $(DEMO_DIR) $(DEMO_DATA) --jobs $(JOBS) --val-fraction 0.15 --test-fraction 0.15

demo: setup $(DEMO_DATA)
	$(VENV)/bin/brats-train compare $(DEMO_DATA) --out runs/demo --reuse $(DEMO_ARGS) $(DEMO_VOLUMES) $(ARGS)

train: setup
	@echo "training on $(TRAIN_DATA)"
	@if [ "$(NPROC)" -gt 1 ]; then \
	  $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m trainer fit $(TRAIN_DATA) --modality $(MODALITY) $(ARGS); \
	else \
	  $(VENV)/bin/brats-train fit $(TRAIN_DATA) --modality $(MODALITY) $(ARGS); fi

compare: setup
	$(VENV)/bin/brats-train compare $(TRAIN_DATA) $(ARGS)

# K fold runs over the train and val patients and their out-of-fold whole-volume scores (BRATS_DIR for the volumes)
cv: setup
	$(VENV)/bin/brats-train cross-validate $(TRAIN_DATA) --out runs/cv $(if $(BRATS_DIR),--volumes "$(BRATS_DIR)" --choose-clean-up) $(ARGS)

# one artifact per plane (datasets/recipe-<plane>.h5) and one model per plane (runs/recipe/<plane>): then
#   brats-train predict runs/recipe CASES... --out DIR    (a folder of runs is their ensemble)
recipe: setup
	@if [ -z "$(BRATS_DIR)" ]; then echo "Set BRATS_DIR to your BraTS training folder (see make dataset)"; exit 2; fi
	for plane in $(RECIPE_PLANES); do \
	  $(VENV)/bin/brats-build build "$(BRATS_DIR)" datasets/recipe-$$plane.h5 --plane $$plane --jobs $(JOBS) $(RECIPE_BUILD) && \
	  $(VENV)/bin/brats-train fit datasets/recipe-$$plane.h5 -m all --out $(RECIPE_DIR) --name $$plane $(RECIPE_FIT) \
	    --time-limit $$(awk 'BEGIN { print $(RECIPE_MINUTES) / $(words $(RECIPE_PLANES)) }') $(ARGS) \
	  || exit 1; done

test: setup
	$(PY) -m pytest -q --durations=15 $(ARGS)

bench: setup
	$(PY) benchmarks/bench_build.py
	$(PY) benchmarks/bench_codecs.py
	$(PY) benchmarks/bench_memory.py
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_volume.py
	$(PY) benchmarks/bench_step.py
	$(PY) benchmarks/bench_cpu.py
	$(PY) benchmarks/bench_integrity.py
	$(PY) benchmarks/bench_remote.py

clean:
	rm -rf runs $(DEMO_DIR) $(DEMO_DATA) benchmarks/.cache
