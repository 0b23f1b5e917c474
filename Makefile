# Two entry points for a fresh machine: `make demo` and `make test` (see README Quickstart).
PYTHON ?= python3
VENV ?= .venv
# CPU wheel on machines without a GPU; users with CUDA can set TORCH=torch to get the CUDA build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

# transformers 4.45.0 (experts.compat.MIN_TRANSFORMERS) in a venv of its own: the tests load saved folders with it
VENV_MIN ?= .venv-min

.PHONY: install install-dev venv-min demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The packages are installed editable, so code changes need no reinstall: pip runs again only when setup.cfg
# changes (or after `make clean`).
$(VENV)/.installed: $(BIN)/python setup.cfg
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[encoder,tensorboard]"
	touch $@

$(VENV)/.installed-dev: $(BIN)/python setup.cfg
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

$(VENV_MIN)/.installed:
	$(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/pip install -q "$(TORCH)" transformers==4.45.0
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

venv-min: $(VENV_MIN)/.installed

# The demo's own settings (README "The built-in demo"): experts get half of a 1M-token budget, a 2048-token vocabulary,
# the c-BTM ensembles and the parameter average (no MoE finetune), every test document evaluated (the bootstrap
# interval needs them), few-shot shrunk to one seed of dense and top-2, two stages at once.
DEMO_FLAGS ?= --seed-fraction 0.5 --vocab-size 2048 --train-tokens 1000000 --merge-methods ensemble,average \
	--eval-max-docs 0 --fewshot-models dense,ensemble_top2 --fewshot-seeds 13 --workers 2

demo: install
	$(BIN)/luigi --module pipeline RunAll --local-scheduler $(DEMO_FLAGS)

# The tests start several pipelines at once on purpose (concurrent runs, luigid workers, kills); each sizes its
# threads to the whole machine, so they run with one thread each unless OMP_NUM_THREADS is set. `make demo` needs
# no such setting: its stages size their threads to the cores ÷ --workers (corpus/threads.py).
test: install-dev venv-min
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} CBTM_MIN_TRANSFORMERS_PYTHON=$(VENV_MIN)/bin/python $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(VENV_MIN) runs
