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
# Debian's Chromium for the web page's browser test (tests/test_web.py), when apt is there; the test
# skips with its reason where no browser could be installed. Playwright never downloads one.
setup-test: $(VENV)/.installed-test
	@test -x /usr/bin/chromium || (command -v apt-get >/dev/null && export DEBIAN_FRONTEND=noninteractive && \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1))) || \
	  echo "chromium not installed: the browser test will skip"

# The whole recipe (pretrain, SFT, label, RM, PPO, report); a second run skips finished stages.
demo: setup
	$(BIN)/chatfoundry pipeline --out runs/demo
	echo "What is the capital of France?" | $(BIN)/chatfoundry chat --ckpt runs/demo/ppo --temperature 0
	echo "How much is 512 minus 89?" | $(BIN)/chatfoundry chat --ckpt runs/demo/sft --tools calculator --temperature 0

test: setup-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
