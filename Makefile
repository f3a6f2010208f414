# Two commands do all the set-up on a fresh machine:
#   make demo   runs the async-RL demonstration (CPU, embedded default configuration)
#   make test   runs the test suite and ruff
# Each creates or reuses .venv and installs what it needs.
#   make test-verl  runs the verl integration tests in their own venv, .venv-verl (verl pins
#                   transformers<5.11, which TRL's environment cannot share).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of torch pinned for this machine and CI; the package itself only needs torch>=2.4.
TORCH_PIN ?= torch==2.13.0
STAMP  := $(VENV)/.installed-$(shell echo $(TORCH_PIN) | tr -c 'a-zA-Z0-9.\n' _)

.PHONY: venv test demo quick lint bench mutate clean venv-verl test-verl

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev,trl]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check vcpo_optim tests examples benchmarks tools
	$(PY) -m ruff format --check vcpo_optim tests examples benchmarks tools
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m vcpo_optim.demo --out demo_out

quick: $(STAMP)
	$(PY) -m vcpo_optim.demo --quick --out demo_out_quick

lint: $(STAMP)
	$(PY) -m ruff check vcpo_optim tests examples benchmarks tools
	$(PY) -m ruff format --check vcpo_optim tests examples benchmarks tools

bench: $(STAMP)
	$(PY) benchmarks/bench_step.py
	$(PY) benchmarks/bench_opob.py

# verl's environment. verl 0.9.1 is installed without its dependencies (ray[default], wandb,
# tensorboard, torchdata, ... and the vllm/sglang/megatron extras pin a CUDA torch), plus what
# importing its FSDP engine needs; torch stays the pinned CPU build (asked for in the same pip
# call, so nothing can replace it). Versions are the ones tested.
VERL_VENV  ?= .venv-verl
VERL_PY    := $(VERL_VENV)/bin/python
VERL_PIN   ?= verl==0.9.1
VERL_DEPS  ?= transformers==5.10.4 tensordict==0.10.0 ray==2.60.0 peft==0.21.2 hydra-core==1.3.8 \
              datasets==5.2.0 pillow==13.0.0 codetiming==1.4.0 numpy packaging pytest
VERL_STAMP := $(VERL_VENV)/.installed-$(shell echo $(TORCH_PIN) $(VERL_PIN) | tr -c 'a-zA-Z0-9.\n' _)

$(VERL_STAMP): pyproject.toml Makefile
	test -x $(VERL_PY) || $(PYTHON) -m venv $(VERL_VENV)
	$(VERL_PY) -m pip install -q --upgrade pip
	$(VERL_PY) -m pip install -q "$(TORCH_PIN)"
	$(VERL_PY) -m pip install -q "$(TORCH_PIN)" $(VERL_DEPS)
	$(VERL_PY) -m pip install -q --no-deps "$(VERL_PIN)"
	$(VERL_PY) -m pip install -q --no-deps -e .
	touch $(VERL_STAMP)

venv-verl: $(VERL_STAMP)

test-verl: $(VERL_STAMP)
	VCPO_VERL_TESTS=1 $(VERL_PY) -m pytest -q tests/integrations_verl

# Mutation testing before a release (not CI): one pytest run per mutation in tools/mutations.py (15-20 min).
mutate: $(STAMP)
	$(PY) tools/mutate.py

clean:
	rm -rf $(VENV) $(VERL_VENV) build *.egg-info demo_out demo_out_quick
