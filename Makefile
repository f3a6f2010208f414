# Two commands do all the set-up on a fresh machine:
#   make demo   runs the async-RL demonstration (CPU, embedded default configuration)
#   make test   runs the test suite and ruff
# Each creates or reuses .venv and installs what it needs.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of torch pinned for this machine and CI; the package itself only needs torch>=2.4.
TORCH_PIN ?= torch==2.13.0
STAMP  := $(VENV)/.installed-$(shell echo $(TORCH_PIN) | tr -c 'a-zA-Z0-9.\n' _)

.PHONY: venv test demo quick lint bench mutate clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check vcpo_optim tests examples benchmarks
	$(PY) -m ruff format --check vcpo_optim tests examples benchmarks
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m vcpo_optim.demo --out demo_out

quick: $(STAMP)
	$(PY) -m vcpo_optim.demo --quick --out demo_out_quick

lint: $(STAMP)
	$(PY) -m ruff check vcpo_optim tests examples benchmarks
	$(PY) -m ruff format --check vcpo_optim tests examples benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_step.py
	$(PY) benchmarks/bench_opob.py

# Mutation testing before a release (not CI): one pytest run per mutation in tools/mutations.py.
mutate: $(STAMP)
	$(PY) tools/mutate.py

clean:
	rm -rf $(VENV) build *.egg-info demo_out demo_out_quick
