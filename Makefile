# Quick start:  make demo  (set up .venv and run the 4-node simulation)  |  make test
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

PYTHON ?= python3
.PHONY: setup lock demo test bench eval mutate mutate-fresh mutate-save clean

setup: $(STAMP)

# Every machine of a federation runs the same versions: requirements.lock pins everything
# (make lock). torch first: on a CPU machine `pip install torch==2.13.0` takes the CPU wheel
# (on this machine kind it lies on disk), on a GPU machine the CUDA build of the same release.
# The project itself goes in last without dependencies, so nothing resolves a newer version.
$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "spes-flower needs Python >= 3.11 (flwr 1.42, transformers 5); $(PYTHON) is `$(PYTHON) -V 2>&1`." \
	       "Run: make setup PYTHON=python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements.lock
	$(PIP) install --quiet --no-deps -e ".[dev]"
	$(PY) scripts/lock.py --check
	touch $@

# Rewrite requirements.lock and pyproject.toml [tool.uv] from what .venv has installed
# (after adding or upgrading a dependency there).
lock:
	$(PY) scripts/lock.py

demo: setup
	$(PY) -m sim run_name=demo output_dir=outputs

# The formatter and linter first (seconds), then the suite in TEST_WORKERS processes, a test
# file to a process (module fixtures run once): most of the suite's time is Flower polling and
# process start-up, so two processes share 2 CPUs well (docs/testing.md has the figures).
TEST_WORKERS ?= 2
test: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# SPES vs DiLoCo vs FedAvg vs centralized (tiny model; ~17 min on 2 CPUs), memory per node
# (model=small) and Flower overhead -> benchmarks/results.json, docs/benchmarks.md.
# Ablations: $(PY) -m bench --ablation merge|H|nodes|iid|all  -> docs/results.md
bench: setup
	$(PY) -m bench $(BENCH_ARGS)

# lm-eval-harness on the demo's checkpoint: held-out perplexity (offline) and, when the hub is
# reachable, the paper's downstream suite -> outputs/demo/model/eval.json and report.md.
# Other checkpoints/tasks: $(PY) -m evaluation <checkpoint> --tasks heldout,hellaswag
EVAL_CHECKPOINT ?= outputs/demo/model
eval: setup
	$(PY) -m evaluation $(EVAL_CHECKPOINT) $(EVAL_ARGS)

# Mutation testing of the method's core (docs/testing.md; hours on 2 CPUs, not part of CI).
# Resumable: mutmut keeps each verdict under mutants/, and the caught ones are saved in
# benchmarks/mutation_state.json so a fresh clone goes on from them (mutate-fresh: from nothing).
# MUTANTS='strategy.merging*' narrows it. Stopped with Ctrl-C: `make mutate-save` keeps the verdicts.
mutate: setup
	$(PY) scripts/mutation_state.py restore
	-$(VENV)/bin/mutmut run $(MUTANTS)
	$(MAKE) mutate-save

mutate-fresh: setup
	rm -rf mutants
	-$(VENV)/bin/mutmut run $(MUTANTS)
	$(MAKE) mutate-save

mutate-save:
	$(PY) scripts/mutation_state.py save
	$(PY) scripts/mutation_report.py

clean:
	rm -rf outputs .pytest_cache mutants
