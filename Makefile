# The README's commands. Each bootstraps .venv itself (idempotent) on a fresh clone.
VENV := .venv
PY := $(VENV)/bin/python
# Runs a command on loopback only (a private network namespace when root on a multi-interface host).
ON_LOOPBACK := $(PY) -m infra.local.netns
PYTEST_ARGS ?=
# Ray worker nodes beside the head (each its own raylet, object store and share of the CPUs); the demo needs 2.
STACK_WORKERS ?= 2

.PHONY: install test test-slow test-e2e test-all lint demo stack-up stack-down stack-status bench clean

install:
	@bash scripts/bootstrap.sh

test: install
	$(ON_LOOPBACK) $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Tests that install from the package registries run outside the loopback namespace, where the network is.
test-slow: install
	$(ON_LOOPBACK) $(PY) -m pytest -m "slow and not network" $(PYTEST_ARGS)
	$(PY) -m pytest -m "slow and network" $(PYTEST_ARGS)

# The full proof that it learns: all ten digits through the real jobs (~8 min on 2 cores).
test-e2e: install
	$(ON_LOOPBACK) $(PY) -m pytest -m "slow and e2e" -s tests/e2e $(PYTEST_ARGS)

test-all: install
	$(ON_LOOPBACK) $(PY) -m pytest -m "not network" $(PYTEST_ARGS)
	$(PY) -m pytest -m "network" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

stack-up: install
	$(VENV)/bin/hybriddit stack up --workers $(STACK_WORKERS)

stack-down: install
	$(VENV)/bin/hybriddit stack down

stack-status: install
	$(VENV)/bin/hybriddit stack status

demo: install
	$(VENV)/bin/hybriddit stack up --workers $(STACK_WORKERS)
	$(VENV)/bin/hybriddit exec -- $(PY) scripts/demo.py

# Each benchmark prints its figures and the ratio it is judged by; see the README's Benchmarks section.
BENCHMARKS := attention_scaling encode_throughput train_input checkpoint_transfer cache_scale demo_time gpu_train_step lit_conversion hidit_stages

bench: install
	@for b in $(BENCHMARKS); do echo "== benchmarks/$$b.py"; $(ON_LOOPBACK) $(PY) benchmarks/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) .stack .pytest_cache
