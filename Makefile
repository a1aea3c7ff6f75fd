# Two entry points: `make demo` (set up, run the main job) and `make test` (set up, run the tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The pinned CPU wheel first, so a range like torch>=2.4 is already satisfied and no multi-GB
# CUDA build is pulled. Override on a GPU machine: make demo TORCH=torch
TORCH  ?= torch==2.13.0

.PHONY: demo test setup setup-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

# The whole recipe (pretrain, SFT, label, RM, PPO, report); a second run skips finished stages.
demo: setup
	$(BIN)/chatfoundry pipeline --out runs/demo
	echo "What is the capital of France?" | $(BIN)/chatfoundry chat --ckpt runs/demo/ppo --temperature 0

test: setup-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
