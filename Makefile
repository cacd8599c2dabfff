# Quick start:  make demo  (set up .venv and run the 4-node simulation)  |  make test
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch first, pinned: the CPU wheel of 2.13.0 lies on this machine kind's disk, while an
# unpinned torch (pulled in by another package) would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(PY) -m sim run_name=demo output_dir=outputs

test: setup
	$(PY) -m pytest -q

# SPES vs DiLoCo vs FedAvg vs centralized (tiny model; ~17 min on 2 CPUs), memory per node
# (model=small) and Flower overhead -> benchmarks/results.json, docs/benchmarks.md.
# Ablations: $(PY) -m sim.bench --ablation merge|H|nodes|iid|all  -> docs/results.md
bench: setup
	$(PY) -m sim.bench $(BENCH_ARGS)

clean:
	rm -rf outputs .pytest_cache
